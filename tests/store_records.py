"""Records for store tests: one with every field set to a value worth round-tripping, and small
variations of it. Every store must give back exactly what it was given."""

from __future__ import annotations

from typing import Any

from ollama_metrics.analytics.stores import FIELD_NAMES, Record

T0 = 1_700_000_000.0


def full_record(n: int = 0, **changes: Any) -> Record:
    """A record using every field: unicode, quotes, JSON lists and dicts, False, zero, None."""
    record: Record = {
        "id": f"rec-{n:05d}",
        "started_at": T0 + n + 0.123456,
        "ended_at": T0 + n + 1.654321,
        "client_ip": "2001:db8::1",
        "user_agent": "ollama-python/0.4.7 (x86_64 linux) Python/3.11",
        "method": "POST",
        "path": "/api/chat?x=1",
        "endpoint": "/api/chat",
        "model": "llama3.2:3b",
        "stream": False,
        "options": {"temperature": 0.7, "num_ctx": 8192, "stop": ["\n", "</s>"],
                    "nested": {"déjà": [1, 2.5, None, True, "vu"]}},
        "http_status": 200,
        "outcome": "success",
        "error": None,
        "prompt": "Wie heißt die Hauptstadt? 日本語 🦙 it's \"quoted\"; back\\slash; 100% --",
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "héllo 🦙",
                      "images": [{"bytes": 3, "sha256": "ab" * 32}]}],
        "system": "be brief",
        "response": "Berlin. Ça va? 答案",
        "thinking": "The user asks… in German",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
        "images": [{"bytes": 3, "sha256": "ab" * 32}, {"url": "https://example.com/a.png"}],
        "image_count": 2,
        "prompt_category": "question",
        "ttft": 0.25,
        "duration": 1.53086,
        "total_duration": 1.5,
        "load_duration": 0.0,
        "prompt_eval_duration": 0.125,
        "eval_duration": 1.125,
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "tokens_per_second": 30.222222222222222,
        "request_bytes": 1234,
        "response_bytes": 5678,
        "done_reason": "stop",
        "embedding_dims": None,
        "truncated": True,
        "capture": "full",
        "truncated_fields": ["messages", "options"],
        "tokens_estimated": False,
    }
    assert set(record) == set(FIELD_NAMES), "a field was added: give it a value here"
    record.update(changes)
    return record


def sparse_record(n: int, **changes: Any) -> Record:
    """Only an id and a start time (every other field missing), plus `changes`."""
    return {"id": f"sparse-{n:05d}", "started_at": T0 + n, **changes}
