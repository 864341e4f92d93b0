"""Build DeepSpeed's JIT ops once at setup, so no training run pays the 2-3 minute compile.

Run by `make setup`: python -m shipyard.train.warmup
"""

from __future__ import annotations


def warm_deepspeed_ops() -> list[str]:
    """Compile (or load from ~/.cache/torch_extensions) the ops this machine's runs will load."""
    from deepspeed.accelerator import get_accelerator

    built = []
    # On CPU, every init_distributed loads the shared-memory collective op.
    if get_accelerator().device_name() == "cpu":
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            builder.load()
            built.append(builder.absolute_name())
    return built


if __name__ == "__main__":
    names = warm_deepspeed_ops()
    print(f"DeepSpeed ops ready: {', '.join(names) or 'none needed on this accelerator'}")
