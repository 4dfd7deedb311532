"""A bounded load test: 200 image chats at concurrency 32, every answer complete, no errors.
(Speed is measured by the benchmarks, not here.)"""

from __future__ import annotations

import asyncio

from tests.serving.helpers import image_message

REQUESTS, CONCURRENCY, MAX_TOKENS = 200, 32, 8


def test_200_requests_at_concurrency_32(server, photo_urls):
    from openai import AsyncOpenAI

    async def run():
        client = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0, timeout=300)
        gate = asyncio.Semaphore(CONCURRENCY)
        in_flight = peak = 0

        async def one(i):
            nonlocal in_flight, peak
            async with gate:
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    messages = [image_message([photo_urls[i % len(photo_urls)]], f"Question {i}: what is it?")]
                    if i % 2:
                        stream = await client.chat.completions.create(
                            model=server.model, messages=messages, max_tokens=MAX_TOKENS, stream=True,
                            stream_options={"include_usage": True}, temperature=0, extra_body={"ignore_eos": True})
                        usage, finish = None, None
                        async for chunk in stream:
                            usage = chunk.usage or usage
                            if chunk.choices and chunk.choices[0].finish_reason:
                                finish = chunk.choices[0].finish_reason
                        return usage.completion_tokens, finish
                    r = await client.chat.completions.create(
                        model=server.model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                        extra_body={"ignore_eos": True})
                    return r.usage.completion_tokens, r.choices[0].finish_reason
                finally:
                    in_flight -= 1

        results = await asyncio.gather(*(one(i) for i in range(REQUESTS)), return_exceptions=True)
        await client.close()
        return results, peak

    results, peak = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert peak == CONCURRENCY
    assert len(results) == REQUESTS
    for tokens, finish in results:
        assert finish in ("length", "stop")
        assert 1 <= tokens <= MAX_TOKENS
