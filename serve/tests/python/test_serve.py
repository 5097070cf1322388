"""The serving stack against the official `openai` client: completions and chat, streaming and
not, greedy outputs identical between an aggregated worker and disaggregated prefill/decode
with TP 1->1, 2->1, 1->2 (over shm, and 2->1 over tcp); a decode worker SIGKILLed mid-stream (the stream completes with the
same text); prefill workers killed (retried elsewhere, or a clear error in bounded time); a
client that disconnects mid-stream (its KV blocks are freed on every worker)."""

import os
import signal
import time

import openai
import pytest

from conftest import get, labelled, metric

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "nixl moves bytes",
]
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something about KV caches."}]
N = 48

TOPOLOGIES = {
    "aggregated": ("--aggregated",),
    "tp1to1": ("--prefill-tp", "1", "--decode-tp", "1"),
    "tp2to1": ("--prefill-tp", "2", "--decode-tp", "1"),
    "tp1to2": ("--prefill-tp", "1", "--decode-tp", "2"),
    "tcp_tp2to1": ("--backend", "tcp", "--prefill-tp", "2", "--decode-tp", "1"),
}


def completion(c, prompt, n, **kw):
    """(text, log-probabilities of its tokens), streamed or not."""
    r = c.completions.create(model="nixl-ref", prompt=prompt, max_tokens=n, temperature=0,
                             logprobs=0, **kw)
    if not kw.get("stream"):
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == n
        return r.choices[0].text, r.choices[0].logprobs.token_logprobs
    text, lps = "", []
    for ch in r:
        for choice in ch.choices:
            text += choice.text
            if choice.logprobs:
                lps += choice.logprobs.token_logprobs
    return text, lps


def outputs(d):
    """Texts and the exact log-probabilities of every token (any change in the KV a token
    attends to changes them)."""
    c = d.client()
    out = []
    for p in PROMPTS:
        out.append(completion(c, p, N))
        out.append(completion(c, p, N, stream=True))
    r = c.chat.completions.create(model="nixl-ref", messages=CHAT, max_tokens=N, temperature=0,
                                  logprobs=True)
    assert r.choices[0].message.role == "assistant"
    out.append((r.choices[0].message.content, [t.logprob for t in r.choices[0].logprobs.content]))
    s = c.chat.completions.create(model="nixl-ref", messages=CHAT, max_tokens=N, temperature=0,
                                  logprobs=True, stream=True,
                                  stream_options={"include_usage": True})
    text, lps, usage = "", [], None
    for ch in s:
        if ch.usage:
            usage = ch.usage
        for choice in ch.choices:
            text += choice.delta.content or ""
            if choice.logprobs:
                lps += [t.logprob for t in choice.logprobs.content]
    assert usage is not None and usage.completion_tokens == N
    out.append((text, lps))
    return out


@pytest.fixture(scope="session")
def reference(deployments):
    return outputs(deployments(*TOPOLOGIES["aggregated"]))


def test_reference_outputs_are_sane(reference):
    for i in range(0, len(reference), 2):
        # Streaming and not give the same text.
        assert reference[i] == reference[i + 1]
    for t, lps in reference:
        assert len(t) == N and len(lps) == N
        assert len(set(t)) > 4, t
        assert all(lp <= 0 for lp in lps) and len(set(lps)) > 4, lps
    assert reference[0][0] != reference[2][0]


@pytest.mark.parametrize("topology", ["tp1to1", "tp2to1", "tp1to2", "tcp_tp2to1"])
def test_disaggregated_equals_aggregated(deployments, reference, topology):
    d = deployments(*TOPOLOGIES[topology])
    assert outputs(d) == reference
    # The KV went through handoffs, and every block came back.
    for w in d.workers():
        assert labelled(w["url"], "nixl_serve_handoffs_total", 'outcome="done"') >= 1
        assert wait_blocks_free(w["url"])


def test_models_health_and_errors(deployments):
    d = deployments(*TOPOLOGIES["aggregated"])
    c = d.client()
    assert [m.id for m in c.models.list().data] == ["nixl-ref"]
    assert '"status":"ok"' in get(d.url + "/health")
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-9", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="nixl-ref", prompt="x", max_tokens=100000)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="nixl-ref", messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="nixl-ref", prompt="x" * 3000, max_tokens=10)
    assert e.value.body["code"] == "context_length_exceeded"
    # A stop string ends the text before it.
    full = c.completions.create(model="nixl-ref", prompt=PROMPTS[1], max_tokens=N,
                                temperature=0).choices[0].text
    stop = full[10:13]
    cut = full[:full.index(stop)]
    r = c.completions.create(model="nixl-ref", prompt=PROMPTS[1], max_tokens=N,
                             temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    s = c.completions.create(model="nixl-ref", prompt=PROMPTS[1], max_tokens=N,
                             temperature=0, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in s if ch.choices) == cut
    # Seeded sampling is reproducible.
    a, b = (c.completions.create(model="nixl-ref", prompt="abc", max_tokens=20,
                                 temperature=0.8, seed=7).choices[0].text for _ in range(2))
    assert a == b
    assert "nixl_serve_time_to_first_token_seconds_count" in get(d.url + "/metrics")


def wait_blocks_free(url, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        if metric(url, "nixl_serve_kv_blocks_used") == 0:
            return True
        time.sleep(0.1)
    return False


def busy_decode(d):
    """The decode worker that holds a request now."""
    import json
    for _ in range(100):
        for w in d.workers("decode"):
            try:
                if json.loads(get(w["url"] + "/load"))["active_requests"] > 0:
                    return w
            except OSError:
                pass  # a worker killed by an earlier test
        time.sleep(0.02)
    raise AssertionError("no decode worker holds the request")


LONG = 160


def test_decode_killed_mid_stream_the_stream_completes_identically(deployments):
    d = deployments("--prefill", "1", "--decode", "3", "--step-delay-ms", "15")
    c = d.client()
    want = completion(c, PROMPTS[0], LONG)
    s = c.completions.create(model="nixl-ref", prompt=PROMPTS[0], max_tokens=LONG,
                             temperature=0, stream=True, logprobs=0)
    text, lps, killed = "", [], None
    for ch in s:
        if not ch.choices:
            continue
        text += ch.choices[0].text
        if ch.choices[0].logprobs:
            lps += ch.choices[0].logprobs.token_logprobs
        if killed is None and len(text) >= 30:
            killed = busy_decode(d)
            os.kill(killed["pid"], signal.SIGKILL)
    assert killed is not None
    # The migrated request (prefilled again on other workers) goes on with the very same
    # tokens and log-probabilities.
    assert (text, lps) == want
    assert metric(d.url, "nixl_serve_migrations_total") >= 1
    # The other workers are left with nothing held.
    for w in d.workers():
        if w is not killed:
            assert wait_blocks_free(w["url"])


def test_client_disconnect_frees_blocks_on_every_worker(deployments):
    d = deployments("--prefill", "1", "--decode", "3", "--step-delay-ms", "15")
    c = d.client()
    s = c.chat.completions.create(model="nixl-ref", messages=CHAT, max_tokens=400,
                                  temperature=0, stream=True)
    n = 0
    for ch in s:
        n += 1
        if n == 10:
            break
    w = busy_decode(d)
    assert metric(w["url"], "nixl_serve_kv_blocks_used") > 0
    s.close()
    for w2 in d.workers():
        if alive_url(w2["url"]):
            assert wait_blocks_free(w2["url"]), w2
    assert labelled(w["url"], "nixl_serve_requests_total", 'status="cancelled"') >= 1


def alive_url(url):
    try:
        get(url + "/health", timeout=1)
        return True
    except OSError:
        return False


def test_prefill_killed_retried_elsewhere_then_a_clear_error(deployments):
    d = deployments("--prefill", "2", "--decode", "1")
    c = d.client()
    want = c.completions.create(model="nixl-ref", prompt=PROMPTS[1], max_tokens=20,
                                temperature=0).choices[0].text
    p0, p1 = d.workers("prefill")
    os.kill(p0["pid"], signal.SIGKILL)
    for _ in range(4):
        r = c.completions.create(model="nixl-ref", prompt=PROMPTS[1], max_tokens=20,
                                 temperature=0)
        assert r.choices[0].text == want
    os.kill(p1["pid"], signal.SIGKILL)
    t = time.time()
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model="nixl-ref", prompt=PROMPTS[1], max_tokens=20, temperature=0)
    assert e.value.status_code == 503
    assert "prefill" in e.value.message
    assert time.time() - t < 10


def cached_tokens(c, prompt):
    r = c.completions.create(model="nixl-ref", prompt=prompt, max_tokens=4, temperature=0)
    return r.usage.prompt_tokens_details.cached_tokens


@pytest.mark.parametrize("mode", ["kv", "round-robin"])
def test_kv_router_places_shared_prefixes_on_the_worker_that_holds_them(deployments, mode):
    d = deployments("--aggregated", "--workers", "2", "--router", mode)
    c = d.client()
    system = "A long shared system prompt about moving KV blocks between workers. " * 4
    hits = []
    for i in range(4):
        hits.append(cached_tokens(c, system + f"question {i}?"))
        time.sleep(0.6)  # the router's followers poll the workers' events every 50 ms
    assert hits[0] == 0
    if mode == "kv":
        assert all(h >= 256 for h in hits[1:]), hits
        assert metric(d.url, "nixl_serve_cache_hit_rate") > 0.5
    else:
        assert hits[1] == 0, hits  # the other worker, which holds nothing yet


def test_concurrent_requests_equal_their_sequential_answers(deployments):
    """Many requests at once (batched decode steps, overlapping handoffs, shared prefixes)
    give exactly what each gives alone on an aggregated worker."""
    from concurrent.futures import ThreadPoolExecutor
    prompts = [f"Shared prefix for every request here. Request number {i}: " * (1 + i % 3)
               for i in range(16)]
    agg = deployments(*TOPOLOGIES["aggregated"]).client()
    want = [completion(agg, p, 24) for p in prompts]
    d = deployments("--prefill", "2", "--decode", "2", "--prefill-tp", "2", "--decode-tp", "1")
    c = d.client()
    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(lambda ip: completion(c, ip[1], 24, stream=ip[0] % 2 == 1),
                          enumerate(prompts)))
    assert got == want
    for w in d.workers():
        assert wait_blocks_free(w["url"])


def test_overload_waits_preempts_and_still_answers_exactly(deployments):
    """A KV cache far too small for the load: prefills and pulls wait for blocks, running
    requests that find none are preempted and prefilled again elsewhere; every client still
    gets exactly the tokens of an unloaded run, and every block comes back."""
    from concurrent.futures import ThreadPoolExecutor
    prompts = [f"Overload {i % 3}: a prompt of a few KV blocks. " * 4 + str(i) for i in range(24)]
    agg = deployments(*TOPOLOGIES["aggregated"]).client()
    want = [completion(agg, p, 40) for p in prompts]
    d = deployments("--prefill", "1", "--decode", "2", "--blocks", "40")
    c = d.client(timeout=120)
    with ThreadPoolExecutor(24) as ex:
        got = list(ex.map(lambda p: completion(c, p, 40, stream=True), prompts))
    assert got == want
    for w in d.workers():
        assert wait_blocks_free(w["url"])
