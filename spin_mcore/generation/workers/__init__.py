"""Engine workers: opponent generation in a separate process with its own Python environment.

``protocol`` is the job/response format (stdlib only); ``vllm_worker`` serves a job with one
``vllm.LLM``. Nothing here imports Megatron: the worker runs under the engine environment's
interpreter (``generation.python``, default ``.venv-vllm/bin/python``).
"""
