"""The SFT data path: records -> templated, tokenised prompts -> split -> packed rows.

Modules, one job each: ``records`` (loading), ``templates`` (prompt text), ``tokenizer``
(SentencePiece / HF tokenizers), ``split`` (held-out split, subsampling), ``tokenize``
(ids with length limits), ``packing`` (pair packing and the sample index, C++ with a
Python fallback), ``prepare`` (one call from ``cfg.data`` to tokenised train / held-out),
``preflight`` (the same inputs checked in the launching process, before any rank starts),
``token_store`` (the stages' binary token ids, one ``.npy`` per record) and ``dali_loader``
(NVIDIA DALI's reader over that store).
"""
