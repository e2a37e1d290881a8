"""Sampling text from a model: the public names of `ownllm.decoding`, where they live (kept so that
`from ownllm.generation import generate, SamplingOptions, chat_reply` goes on working).

    texts = generate(run.model, run.tokenizer, ["To be or", "Once upon"], max_new_tokens=100, temperature=0.8)
"""

from ownllm.decoding import (IncrementalText, SamplingOptions, answer_all, chat_loop, chat_reply, filter_logits,
                             generate, generate_ids, sample_next)

__all__ = ["IncrementalText", "SamplingOptions", "answer_all", "chat_loop", "chat_reply", "filter_logits",
           "generate", "generate_ids", "sample_next"]
