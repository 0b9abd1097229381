"""The text a class label becomes: a prompt template such as ``"a video of {}"`` (X-CLIP's class-name
prompts), shared by zero-shot classification and by the tables of labeled videos that ``train`` and ``eval``
read. Torch-free, so that the command line can check a template before it loads anything."""

from __future__ import annotations

DEFAULT_TEMPLATE = "a video of {}"


def check_template(template: str) -> str:
    """``template`` where ``template.format(label)`` makes a prompt of any label: ``{}`` where the label goes,
    other braces doubled (``{{``, ``}}``); else a :class:`ValueError` that says what is wrong."""
    try:
        prompt = template.format("\0")
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(
            f"the template must have one '{{}}' where the label goes and no other braces (write '{{{{' or "
            f"'}}}}' for a brace): {template!r}"
        ) from e
    if "\0" not in prompt:
        raise ValueError(f"the template must contain '{{}}' where the label goes: {template!r}")
    return template
