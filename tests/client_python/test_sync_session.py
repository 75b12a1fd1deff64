"""The sync API: a background loop thread, so it works in scripts and inside a running loop."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import numpy as np
import pytest
from sluice_client import Client, ErrorCode, SluiceError, stream_to_display

from protocol.messages import Cancel, Embed
from tests.client_python.fake_server import FakeServer, expected_text, expected_vector
from tests.client_python.knobs import FAST


def _until(predicate, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_sync_streaming_and_result(fake: FakeServer) -> None:
    with Client(fake.url, backoff=FAST) as client:
        s = client.session()
        stream = s.generate("sync hello")
        pieces = list(stream)
        assert "".join(pieces) == expected_text("sync hello", 12) and len(pieces) == 12
        assert stream.result is not None and stream.result.finish_reason == "stop"
        assert s.chat("hi").collect().text.startswith("[1] ")
        assert s.generate("opts", options={"max_tokens": 2}).collect().text == expected_text("opts", 2)
        with pytest.raises(SluiceError) as failure:
            s.generate("x", model="error:model_not_found").collect()
        assert failure.value.code is ErrorCode.MODEL_NOT_FOUND


async def test_sync_api_inside_a_running_event_loop(fake: FakeServer) -> None:
    # Like a Jupyter cell: a loop is running in this thread, and the sync API must not need it.
    assert asyncio.get_running_loop().is_running()
    with Client(fake.url, backoff=FAST) as client:
        s = client.session()
        assert "".join(s.generate("inside a loop")) == expected_text("inside a loop", 12)
        vectors = s.embed(["a", "b", "c"])
        np.testing.assert_array_equal(vectors[2], expected_vector("c", 8))
        assert s.classify("text", ["a", "b"]).keys() == {"a", "b"}


def test_break_cancels_the_generation(fake: FakeServer) -> None:
    fake.piece_delay_s = 0.02
    with Client(fake.url, backoff=FAST) as client:
        s = client.session()
        stream = s.generate("break early")
        for _ in stream:
            break
        assert _until(lambda: any(c.id == stream.id for c in fake.received_of(Cancel)))
        assert _until(lambda: s.inflight == [])
        assert stream.result is not None and stream.result.finish_reason == "cancelled"


def test_keyboard_interrupt_sends_cancel_and_is_raised_again(fake: FakeServer) -> None:
    assert threading.current_thread() is threading.main_thread()
    fake.piece_delay_s = 0.1
    main = threading.main_thread().ident
    assert main is not None
    with Client(fake.url, backoff=FAST) as client:
        s = client.session()
        stream = s.generate("interrupt me")
        timer: threading.Timer | None = None
        with pytest.raises(KeyboardInterrupt):
            for _ in stream:
                # The interrupt button, pressed while the loop waits for the next piece.
                timer = threading.Timer(0.02, signal.pthread_kill, (main, signal.SIGINT))
                timer.start()
        assert timer is not None
        timer.join()
        assert _until(lambda: any(c.id == stream.id for c in fake.received_of(Cancel)))
        assert _until(lambda: s.inflight == [])
        assert len(stream.text.split()) == 1


def test_embed_1000_with_progress_bar(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    texts = [f"t{i}" for i in range(1000)]
    with Client(fake.url, backoff=FAST) as client:
        s = client.session()
        vectors = s.embed(texts, batch_size=200)
        assert vectors.shape == (1000, 8)
        np.testing.assert_array_equal(vectors[999], expected_vector("t999", 8))
        assert len(fake.received_of(Embed)) == 5
        assert "1000/1000" in capsys.readouterr().err
        s.embed(texts[:10])
        assert capsys.readouterr().err == ""  # small lists: no bar


def test_display_outside_a_notebook_writes_stdout(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with Client(fake.url, backoff=FAST) as client:
        s = client.session()
        stream = s.generate("show me", display=True)
        assert stream.finished
        assert capsys.readouterr().out == expected_text("show me", 12) + "\n"
        result = stream_to_display(s.generate("and me"))
        assert result.text == expected_text("and me", 12)
        assert capsys.readouterr().out == result.text + "\n"


def test_sync_repr(fake: FakeServer) -> None:
    with Client(fake.url, backoff=FAST) as client:
        s = client.session()
        assert s.id in repr(s) and "websocket" in repr(s) and "0 in flight" in repr(s)
        assert s.summary()["models"]["classify"] == ["fake-classify"]


def test_keyboard_interrupt_during_embed_cancels_its_requests(fake: FakeServer) -> None:
    fake.embed_delay_s = 5.0
    main = threading.main_thread().ident
    assert main is not None
    with Client(fake.url, backoff=FAST) as client:
        s = client.session()
        timer = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            s.embed([f"t{i}" for i in range(600)], batch_size=200, progress=False)
        timer.join()
        sent = {m.id for m in fake.received_of(Embed)}
        assert len(sent) == 3
        assert _until(lambda: {c.id for c in fake.received_of(Cancel)} == sent)
        assert _until(lambda: s.inflight == [])
