"""Model families behind one protocol (family.py): the built-in GPT (gpt/), Hugging Face causal
LMs (huggingface/) and your own modules (factory/). train/, plan/ and serve/ ask
`model_family(job.model)` and never look behind it; a new family touches only its folder and
the table below."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shipyard.errors import SpecError

if TYPE_CHECKING:
    from shipyard.models.family import ModelFamily
    from shipyard.spec.job import JobSpec


def model_family(spec) -> ModelFamily:
    """The family that builds, sizes, exports and serves the model `spec` describes."""
    if spec.type == "gpt":
        from shipyard.models.gpt.family import GptFamily

        return GptFamily(spec)
    if spec.type == "huggingface":
        from shipyard.models.huggingface.family import HuggingFaceFamily

        return HuggingFaceFamily(spec)
    from shipyard.models.factory.family import PythonFamily

    return PythonFamily(spec)


def check_model(job: JobSpec, source: str) -> None:
    """What the spec alone cannot tell: the architecture exists, the weights folder is whole
    and safe to load, the factory imports, the vocabulary covers the tokenizer's, the job's
    layout suits the model. Runs before Ray starts; raises SpecError naming the file and the
    field."""
    from shipyard.data.corpus import tokenizer_vocabulary

    try:
        model_family(job.model).check(job.train, tokenizer_vocabulary(job))
    except ValueError as error:
        raise SpecError(f"{source}: {error}") from None
