"""LLM.stream on tiny random checkpoints (float32, CPU): its pieces add up to generate's output, a stop
string cuts both alike, a stream closed early frees its blocks and one another call ran to its end resumes;
generate's progress bar shows its rate before the last prompt finishes."""
import pytest

from llmfast.engine import SamplingParams
from engine_setup import GREEDY

pytest_plugins = ("engine_setup",)  # its fixtures: tokenizer, checkpoints, llama

pytest.importorskip("transformers")


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=20, ignore_eos=True, logprobs=1),
    SamplingParams(temperature=1.0, n=2, seed=3, max_tokens=10),
], ids=["seeded", "n2"])
def test_stream_equals_generate(llama, params):
    llm, _ = llama
    whole = llm.generate("The quick brown", params, use_tqdm=False)[0].outputs
    pieces = list(llm.stream("The quick brown", params))
    for completion in whole:
        mine = [p for p in pieces if p.index == completion.index]
        assert "".join(p.text for p in mine) == completion.text
        assert [t for p in mine for t in p.token_ids] == completion.token_ids
        assert [p.finish_reason is not None for p in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].finish_reason == completion.finish_reason
        assert mine[-1].cumulative_logprob == pytest.approx(completion.cumulative_logprob, abs=1e-5)
    assert not llm.scheduler.has_unfinished()


def stop_strings_from(llm, prompt, params) -> dict[str, str]:
    """Two stop strings taken from the text ``params`` makes of ``prompt``, each where it first occurs there:
    one inside a token's text (after its first character), one across the boundary of two tokens."""
    out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    text = out.text
    # a token's span in the text, where its decoded prefixes are prefixes of the text (whole characters)
    prefixes = [llm.tokenizer.decode(out.token_ids[:k]) for k in range(len(out.token_ids) + 1)]
    spans = [(len(a), len(b)) for a, b in zip(prefixes, prefixes[1:]) if text.startswith(a) and text.startswith(b)]
    found = {}
    for start, end in spans:
        for where, stop in (("inside_a_token", text[start + 1:end]), ("across_tokens", text[end - 1:end + 1])):
            begin = start + 1 if where == "inside_a_token" else end - 1
            if len(stop) == 2 and "\ufffd" not in stop and text.find(stop) == begin and begin > 0:
                found.setdefault(where, stop)
    assert set(found) == {"inside_a_token", "across_tokens"}, (text, spans)
    return found


@pytest.mark.parametrize("where", ["inside_a_token", "across_tokens"])
def test_a_stop_string_cuts_the_stream_as_it_cuts_generate(llama, where):
    """A stop string the greedy text holds ends the request there (the string left out of the text), whole or
    streamed; the stream's pieces add up to generate's text and tokens."""
    llm, _ = llama
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = llm.generate("The quick brown", greedy, use_tqdm=False)[0].outputs[0].text
    stop = stop_strings_from(llm, "The quick brown", greedy)[where]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=["never in the text", stop])
    whole = llm.generate("The quick brown", params, use_tqdm=False)[0].outputs[0]
    assert whole.text == full[:full.index(stop)] and (whole.finish_reason, whole.stop_reason) == ("stop", stop)
    pieces = list(llm.stream("The quick brown", params))
    assert len(pieces) > 1 and "".join(p.text for p in pieces) == whole.text
    assert [t for p in pieces for t in p.token_ids] == whole.token_ids and len(whole.token_ids) < 20
    assert (pieces[-1].finish_reason, pieces[-1].stop_reason) == ("stop", stop)
    assert not llm.scheduler.has_unfinished()


def test_progress_bar_shows_the_rate_before_the_last_prompt_finishes(llama, monkeypatch):
    """Equal-length requests all finish on the last step: the bar redraws its tokens/s every 0.5 s anyway
    (here every step is 0.5 s later), not only when a prompt finishes (it sat at 0/3 with no rate)."""
    import io
    import itertools
    import re
    from types import SimpleNamespace

    from tqdm import std

    import llmfast.engine.llm as llm_module

    llm, _ = llama
    out = io.StringIO()
    monkeypatch.setattr("tqdm.auto.tqdm", lambda *args, **kwargs: std.tqdm(*args, file=out, **kwargs))
    clock = itertools.count()
    monkeypatch.setattr(llm_module, "time", SimpleNamespace(perf_counter=lambda: 0.5 * next(clock)))
    llm.generate([[1, 2, 3], [4, 5, 6], [7, 8, 9]], GREEDY, use_tqdm=True)
    renders = [line for line in out.getvalue().split("\r") if " 0/3 " in line]
    assert any(int(rate) > 0 for line in renders for rate in re.findall(r"output: (\d+) toks/s", line)), renders


def test_stream_stopped_early_frees_its_blocks(llama):
    llm, _ = llama
    stream = llm.stream([5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert not llm.scheduler.has_unfinished()
    assert llm.block_manager.num_free_blocks == llm.runner.num_kv_blocks


def test_stream_resumes_after_another_call_finished_its_request(llama):
    llm, _ = llama
    stream = llm.stream([9, 8, 7], GREEDY)
    first = next(stream)
    llm.generate([[1, 2]], GREEDY, use_tqdm=False)  # runs the streamed request to its end as well
    rest = list(stream)
    whole = llm.generate([[9, 8, 7]], GREEDY, use_tqdm=False)[0].outputs[0]
    assert first.token_ids + [t for p in rest for t in p.token_ids] == whole.token_ids
    assert rest[-1].finish_reason == "length"
