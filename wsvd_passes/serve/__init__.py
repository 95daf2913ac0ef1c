"""Serving compressed models in vLLM: ``export`` writes a directory vLLM loads, ``plugin`` registers the
model classes of ``vllm_model`` with vLLM (entry point ``vllm.general_plugins``).

Importing this package imports nothing: the exporter needs the wsvd stack, the plugin needs vLLM.
"""
