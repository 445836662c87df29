"""Engine workers: opponent generation in a separate process with its own Python environment.

``protocol`` is the job/response format (stdlib only); ``vllm_worker`` serves a job with one
``vllm.LLM``, ``trtllm_worker`` with one ``tensorrt_llm.LLM`` (CUDA only; EOS kept through stop
words, raw log-probs, optional ModelOpt FP8). Nothing here imports Megatron: the worker runs under
the engine environment's interpreter (``generation.python``, default ``.venv-<backend>/bin/python``).
"""
