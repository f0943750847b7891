#!/usr/bin/env python3
"""The official `openai` Python client against a running `unicorn serve`.

Run by tests/serve.rs, which starts a daemon and the server and sets:
  UNICORN_SERVE_URL    the server's base URL (http://127.0.0.1:PORT)
  UNICORN_SERVE_KEY    the API key the server was started with
  UNICORN_SERVE_MODEL  the id of the model it serves
The server runs with --max-concurrent 4 --max-queue 1 --max-body-bytes 65536 and the model's
default context (4096 tokens for SmolLM2). Figures the checks rely on come from /metrics.
"""

import http.client
import json
import os
import re
import sys
import threading
import time
import unittest
import urllib.parse

import openai

URL = os.environ["UNICORN_SERVE_URL"]
KEY = os.environ["UNICORN_SERVE_KEY"]
MODEL = os.environ["UNICORN_SERVE_MODEL"]
MAX_CONCURRENT = 4
MAX_BODY = 65536
# About 3000 tokens: a prefill that takes a while, within the 4096-token context.
LONG = "The quick brown fox jumps over the lazy dog. " * 300


def client(key=KEY):
    # No retries: a 429 or 503 must be seen, not hidden.
    return openai.OpenAI(base_url=URL + "/v1", api_key=key, max_retries=0, timeout=120)


def raw(method, path, body=None, headers=None, key=KEY):
    """A plain HTTP request: (status, headers, body bytes)."""
    u = urllib.parse.urlsplit(URL)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    h = {"Content-Type": "application/json"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), data


def metrics():
    status, _, body = raw("GET", "/metrics")
    assert status == 200, status
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def metric(name, m=None):
    return (m or metrics()).get(name, 0.0)


def wait_for(pred, timeout=60.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; metrics: {metrics()}")


def idle():
    return metric("unicorn_serve_requests_running") == 0 and metric("unicorn_serve_requests_queued") == 0


def greedy_chat(c, content, max_tokens=32, **kw):
    return c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=max_tokens,
        **kw,
    )


def streamed_chat(c, content, max_tokens=32, **kw):
    """Joined content deltas, finish reasons, usage and chunk arrival times of a stream."""
    stream = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        **kw,
    )
    text, finishes, usage, times = [], [], None, []
    for chunk in stream:
        times.append(time.monotonic())
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                text.append(ch.delta.content)
            if ch.finish_reason is not None:
                finishes.append(ch.finish_reason)
    return "".join(text), finishes, usage, times


class Serve(unittest.TestCase):
    def setUp(self):
        wait_for(idle, what="no request running")

    def test_model_list(self):
        c = client()
        ids = [m.id for m in c.models.list().data]
        self.assertEqual(ids, [MODEL])
        self.assertEqual(c.models.retrieve(MODEL).id, MODEL)

    def test_completion(self):
        c = client()
        r = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
        self.assertEqual(r.object, "text_completion")
        self.assertEqual(len(r.choices), 1)
        text = r.choices[0].text
        self.assertTrue(text.strip(), r)
        self.assertIn(r.choices[0].finish_reason, ("stop", "length"))
        u = r.usage
        self.assertGreater(u.prompt_tokens, 3)
        self.assertTrue(1 <= u.completion_tokens <= 12, u)
        self.assertEqual(u.total_tokens, u.prompt_tokens + u.completion_tokens)
        # Greedy is deterministic, and a seed makes sampling so too.
        again = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
        self.assertEqual(again.choices[0].text, text)
        s1, s2 = (
            c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.9, seed=42)
            for _ in range(2)
        )
        self.assertEqual(s1.choices[0].text, s2.choices[0].text)
        # Without max_tokens a completion stops after 16 tokens, as OpenAI's does.
        d = c.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", temperature=0)
        self.assertLessEqual(d.usage.completion_tokens, 16)

    def test_stop_strings_end_the_text_before_them_streamed_or_not(self):
        c = client()
        full = c.completions.create(model=MODEL, prompt="Here is a list of fruits:", max_tokens=32, temperature=0)
        text = full.choices[0].text
        self.assertGreater(len(text), 12, text)
        # Three characters from the middle: they rarely fall on one token.
        k = len(text) // 2
        stop = text[k : k + 3]
        expected = text[: text.index(stop)]
        r = c.completions.create(model=MODEL, prompt="Here is a list of fruits:", max_tokens=32, temperature=0, stop=[stop, "\u2603\u2603"])
        self.assertEqual(r.choices[0].text, expected)
        self.assertEqual(r.choices[0].finish_reason, "stop")
        chunks = c.completions.create(model=MODEL, prompt="Here is a list of fruits:", max_tokens=32, temperature=0, stop=stop, stream=True)
        self.assertEqual("".join(ch.choices[0].text for ch in chunks if ch.choices), expected)

    def test_streamed_chat_equals_the_non_streamed_answer_under_greedy(self):
        c = client()
        q = "Write a short poem about the sea."
        whole = greedy_chat(c, q, max_tokens=48, seed=3)
        self.assertEqual(whole.object, "chat.completion")
        answer = whole.choices[0].message.content
        self.assertEqual(whole.choices[0].message.role, "assistant")
        self.assertTrue(answer.strip())
        text, finishes, usage, _ = streamed_chat(c, q, max_tokens=48, seed=3, stream_options={"include_usage": True})
        self.assertEqual(text, answer)
        self.assertEqual(finishes, [whole.choices[0].finish_reason])
        self.assertEqual(usage.completion_tokens, whole.usage.completion_tokens)
        self.assertEqual(usage.prompt_tokens, whole.usage.prompt_tokens)

    def test_four_concurrent_streams_each_get_their_own_answer(self):
        c = client()
        prompts = [
            "What is the capital of France?",
            "Name three colors.",
            "Write a haiku about snow.",
            "Explain what a computer is.",
        ]
        alone = [greedy_chat(c, p).choices[0].message.content for p in prompts]
        batched_before = metric("unicorn_daemon_engine_batched_steps_total")
        results = [None] * 4
        barrier = threading.Barrier(4)

        def one(i):
            barrier.wait()
            results[i] = streamed_chat(client(), prompts[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i, r in enumerate(results):
            self.assertIsNotNone(r, f"stream {i} did not finish")
            self.assertEqual(r[0], alone[i], f"stream {i}")
        # They ran at once: every stream had its first chunk before any had its last.
        self.assertLess(max(r[3][0] for r in results), min(r[3][-1] for r in results))
        # And the daemon put their tokens into shared steps.
        self.assertGreater(metric("unicorn_daemon_engine_batched_steps_total"), batched_before)

    def test_a_client_that_disconnects_mid_stream_cancels_its_job(self):
        before = metrics()
        c = client()
        stream = c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": LONG + "\nSummarize this."}],
            max_tokens=500,
            stream=True,
        )
        # The first chunk (the role) comes before the prompt is decoded: hang up during it.
        first = next(iter(stream))
        self.assertEqual(first.choices[0].delta.role, "assistant")
        stream.close()
        key = "unicorn_serve_client_disconnects_total"
        wait_for(lambda: metric(key) == metric(key, before) + 1 and idle(), what="the disconnect")
        after = metrics()
        # The decode in flight was cancelled in the daemon, not run to its end.
        self.assertEqual(
            after.get("unicorn_serve_daemon_jobs_cancelled_total", 0),
            before.get("unicorn_serve_daemon_jobs_cancelled_total", 0) + 1,
        )
        self.assertEqual(
            after.get('unicorn_serve_requests_total{endpoint="chat",status="499"}', 0),
            before.get('unicorn_serve_requests_total{endpoint="chat",status="499"}', 0) + 1,
        )
        # The server and the daemon carry on.
        self.assertEqual(raw("GET", "/health")[0], 200)
        self.assertTrue(greedy_chat(c, "Say hello.", max_tokens=4).choices[0].message.content)

    def assertApiError(self, status, body, code=None, param=None):
        """An OpenAI error object (the status was checked by the caller)."""
        err = json.loads(body)["error"]
        self.assertEqual(set(err), {"message", "type", "param", "code"})
        self.assertTrue(err["message"])
        if code is not None:
            self.assertEqual(err["code"], code)
        if param is not None:
            self.assertEqual(err["param"], param)
        return err

    def test_malformed_json_and_bad_routes(self):
        for body in (b'{"model": "x", "messages": [', b"not json", b"[1, 2]", b""):
            status, _, data = raw("POST", "/v1/chat/completions", body)
            self.assertEqual(status, 400, data)
            err = self.assertApiError(status, data)
            self.assertEqual(err["type"], "invalid_request_error")
        status, _, data = raw("GET", "/v1/nothing-here")
        self.assertEqual(status, 404)
        self.assertApiError(status, data, code="unknown_url")
        status, _, data = raw("GET", "/v1/chat/completions")
        self.assertEqual(status, 405)
        self.assertApiError(status, data)

    def test_unknown_model(self):
        with self.assertRaises(openai.NotFoundError) as cm:
            client().chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(cm.exception.status_code, 404)
        self.assertEqual(cm.exception.code, "model_not_found")
        with self.assertRaises(openai.NotFoundError):
            client().completions.create(model="no-such-model", prompt="hi")

    def test_prompt_over_the_context(self):
        c = client()
        with self.assertRaises(openai.BadRequestError) as cm:
            c.completions.create(model=MODEL, prompt="word " * 5000, max_tokens=4)
        self.assertEqual(cm.exception.code, "context_length_exceeded")
        # A prompt that fits with a max_tokens that does not.
        with self.assertRaises(openai.BadRequestError) as cm:
            greedy_chat(c, "hi", max_tokens=100000)
        self.assertEqual(cm.exception.code, "context_length_exceeded")
        # Streamed, the error comes as a status before any event.
        with self.assertRaises(openai.BadRequestError):
            streamed_chat(c, LONG * 2)

    def test_parameters_out_of_range(self):
        c = client()
        cases = [
            ("temperature", dict(temperature=2.5)),
            ("temperature", dict(temperature=-1)),
            ("top_p", dict(top_p=0)),
            ("top_p", dict(top_p=1.5)),
            ("max_tokens", dict(max_tokens=0)),
            ("n", dict(n=3)),
            ("stop", dict(stop=["a", "b", "c", "d", "e"])),
            ("presence_penalty", dict(presence_penalty=5)),
        ]
        for param, kw in cases:
            kw.setdefault("max_tokens", 4)
            with self.assertRaises(openai.BadRequestError, msg=param) as cm:
                c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **kw)
            self.assertEqual(cm.exception.status_code, 400)
            self.assertEqual(cm.exception.param, param, cm.exception.message)
        with self.assertRaises(openai.BadRequestError) as cm:
            c.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
        self.assertEqual(cm.exception.param, "messages")
        with self.assertRaises(openai.BadRequestError):
            c.chat.completions.create(model=MODEL, messages=[])

    def test_body_too_large(self):
        body = json.dumps({"model": MODEL, "prompt": "x" * (MAX_BODY + 1000)}).encode()
        status, _, data = raw("POST", "/v1/completions", body)
        self.assertEqual(status, 413)
        self.assertApiError(status, data)

    def test_api_key_required(self):
        with self.assertRaises(openai.AuthenticationError) as cm:
            client(key="wrong-" + KEY).models.list()
        self.assertEqual(cm.exception.status_code, 401)
        for path, method in (("/v1/models", "GET"), ("/v1/chat/completions", "POST"), ("/metrics", "GET")):
            status, _, data = raw(method, path, b"{}", key=None)
            self.assertEqual(status, 401, path)
            self.assertApiError(status, data, code="invalid_api_key")
        # The health check needs no key.
        status, _, data = raw("GET", "/health", key=None)
        self.assertEqual((status, json.loads(data)), (200, {"status": "ok"}))

    def test_requests_beyond_the_slots_and_the_queue_get_429(self):
        u = urllib.parse.urlsplit(URL)
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": LONG}], "max_tokens": 400, "stream": True})
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
        conns = []
        try:
            for _ in range(MAX_CONCURRENT):
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
                conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
                self.assertEqual(conn.getresponse().status, 200)
                conns.append(conn)
            # The fifth waits for a slot ...
            waiting = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
            waiting.request("POST", "/v1/chat/completions", body=body, headers=headers)
            conns.append(waiting)
            wait_for(lambda: metric("unicorn_serve_requests_queued") == 1, what="a queued request")
            # ... and the sixth finds no room.
            with self.assertRaises(openai.RateLimitError) as cm:
                greedy_chat(client(), "hi", max_tokens=2)
            self.assertEqual(cm.exception.status_code, 429)
        finally:
            for conn in conns:
                conn.close()
        wait_for(idle, what="the slots to free up")
        self.assertTrue(greedy_chat(client(), "Say hello.", max_tokens=4).choices[0].message.content)

    def test_health_and_metrics(self):
        greedy_chat(client(), "Say hello.", max_tokens=4)
        status, headers, data = raw("GET", "/health")
        self.assertEqual((status, json.loads(data)), (200, {"status": "ok"}))
        status, headers, data = raw("GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/plain"), headers)
        text = data.decode()
        for family, kind in [
            ("unicorn_serve_requests_total", "counter"),
            ("unicorn_serve_request_duration_seconds", "histogram"),
            ("unicorn_serve_time_to_first_token_seconds", "histogram"),
            ("unicorn_serve_prompt_tokens_total", "counter"),
            ("unicorn_serve_completion_tokens_total", "counter"),
            ("unicorn_serve_requests_running", "gauge"),
            ("unicorn_serve_requests_queued", "gauge"),
            ("unicorn_daemon_engine_queue", "gauge"),
        ]:
            self.assertIn(f"# TYPE {family} {kind}\n", text)
            self.assertIn(f"# HELP {family} ", text)
        m = metrics()
        self.assertGreaterEqual(m['unicorn_serve_requests_total{endpoint="chat",status="200"}'], 1)
        self.assertGreaterEqual(m['unicorn_serve_request_duration_seconds_bucket{endpoint="chat",le="+Inf"}'], 1)
        self.assertGreaterEqual(m['unicorn_serve_time_to_first_token_seconds_count{endpoint="chat"}'], 1)
        self.assertGreater(m["unicorn_serve_completion_tokens_total"], 0)
        self.assertEqual(m["unicorn_daemon_up"], 1)
        # Every sample is a valid line of the text format.
        sample = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+]+$')
        for line in text.splitlines():
            if not line.startswith("#"):
                self.assertRegex(line, sample)


if __name__ == "__main__":
    unittest.main(verbosity=2)
