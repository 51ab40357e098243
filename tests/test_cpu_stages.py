"""bench/cpu_stages.py sorts py-spy's stacks into the stages its table reports."""

from __future__ import annotations

from cpu_stages import EVENT_LOOP, PARSE, WRITER, stage_of

LOOP = ("_run_module_as_main (<frozen runpy>:198);<module> (ollama_metrics/__main__.py:3);"
        "run (ollama_metrics/server/serve.py:217);run (uvloop/__init__.py:92);"
        "Runner.run (asyncio/runners.py:118)")
HANDLER = ("RequestHandler._handle_request (aiohttp/web_protocol.py:577);"
           "Proxy.handle (ollama_metrics/server/proxy.py:150);"
           "Proxy._handle (ollama_metrics/server/proxy.py:188)")


def test_a_stack_goes_to_its_deepest_concern_not_to_the_handler_around_it() -> None:
    assert stage_of(f"{LOOP};{HANDLER};categorize (ollama_metrics/observe/categorize.py:"
                    "55)").startswith("record")
    assert stage_of(f"{LOOP};Recorder._flush (ollama_metrics/analytics/recorder.py:130);"
                    "encode (ollama_metrics/analytics/channel.py:40)").startswith("hand-off")
    assert stage_of(f"{LOOP};{HANDLER};Proxy._exchange (ollama_metrics/server/proxy.py:304);"
                    "Proxy._relay (ollama_metrics/server/proxy.py:324);StreamWriter._writelines "
                    "(aiohttp/http_writer.py:116)").startswith("relay")
    assert stage_of(f"{LOOP};{HANDLER};Proxy._exchange (ollama_metrics/server/proxy.py:279);"
                    "ClientSession._request (aiohttp/client.py:819)").startswith("upstream")
    assert stage_of(f"{LOOP};{HANDLER};Proxy._request_body (ollama_metrics/server/proxy.py:228);"
                    "read_request (ollama_metrics/ollama/wire.py:150)") == PARSE
    assert stage_of("Thread._bootstrap (threading.py:1002);_WorkItem.run (concurrent/futures/"
                    "thread.py:58);SqliteStore.write_batch.<locals>.write (ollama_metrics/"
                    "analytics/stores/sqlite.py:342)").startswith("store")


def test_the_writer_process_is_a_stage_of_its_own() -> None:
    """py-spy --subprocesses starts each stack with its process's command line."""
    proxy = 'process 11:"python -m ollama_metrics serve"'
    writer = f'{proxy};process 12:"python -m ollama_metrics.analytics.writer 7"'
    assert stage_of(f"{writer};_run (ollama_metrics/analytics/writer.py:300);build "
                    "(ollama_metrics/analytics/record.py:323)") == WRITER
    assert stage_of(f"{proxy};{LOOP};{HANDLER};categorize (ollama_metrics/observe/"
                    "categorize.py:55)").startswith("record")


def test_the_frames_that_start_the_loop_place_nothing() -> None:
    assert stage_of(LOOP) == EVENT_LOOP  # uvloop's own C code: I/O and callbacks
    assert stage_of(f"{LOOP};RequestHandler.start (aiohttp/web_protocol.py:686)") == PARSE
