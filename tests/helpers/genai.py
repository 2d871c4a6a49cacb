"""Running a folder in onnxruntime-genai (the [genai] extra) the way its users do."""

from __future__ import annotations


def genai_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """onnxruntime-genai's greedy continuation of ``prompt`` by an ``og.Model`` (it stops at EOS without appending
    it)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt):]
