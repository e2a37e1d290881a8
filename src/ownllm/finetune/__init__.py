"""Fine-tuning stages: a pretrained model becomes a classifier, an assistant or a retrieval embedder, fully or
with LoRA.

    from ownllm.finetune import finetune_classify, finetune_embed, finetune_instruct, finetune_prefer, merge_lora_run

`classify` (labelled texts -> a head on the last real token), `instruct` (prompt template, loss on the
responses), `embed` (pairs -> pooled vectors, contrastive with in-batch negatives) and `prefer` (DPO on pairs of
a preferred and a rejected answer; `dpo` holds its loss) each bring their batches, loss and metrics to the one
training loop (`ownllm.training.train`); `common` holds what they share (which
parameters train, LoRA runs, the run directory, merging); loading a fine-tuned run, or the base model a stage starts
from, is ownllm.runs; the classifier model is ownllm.model's, classifying with it ownllm.classification.
"""

from __future__ import annotations

from ownllm.finetune.classify import ClassifyResult, finetune_classify
from ownllm.finetune.common import merge_lora_run
from ownllm.finetune.embed import EmbedResult, finetune_embed
from ownllm.finetune.instruct import InstructResult, finetune_instruct
from ownllm.finetune.prefer import PreferResult, finetune_prefer
from ownllm.model import GPTClassifier

__all__ = ["finetune_classify", "finetune_embed", "finetune_instruct", "finetune_prefer", "merge_lora_run",
           "GPTClassifier", "ClassifyResult", "EmbedResult", "InstructResult", "PreferResult"]
