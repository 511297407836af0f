"""A loader's quantize and quantize_backend resolve to one backend and mode, or to an error that names what works."""

from __future__ import annotations

import pytest

from graphflow.models.quantization import Quantization, QuantizationError, installed, quantization

EXTRA = "needs the graphflow[quantize] extra"


def test_none_is_no_quantization_whatever_the_backend() -> None:
    assert quantization("none", "bitsandbytes", "cpu") is None


@pytest.mark.skipif(not installed("torchao"), reason=f"{EXTRA} (torchao)")
def test_auto_is_torchao_for_int8_and_fp8_and_quanto_for_int4_off_cuda() -> None:
    assert quantization("int8", "auto", "cpu") == Quantization("int8", "torchao")
    assert quantization("fp8", "auto", "cuda") == Quantization("fp8", "torchao")
    if installed("quanto"):
        assert quantization("int4", "auto", "cpu") == Quantization("int4", "quanto")
    assert str(Quantization("int8", "torchao")) == "int8 (torchao)"


@pytest.mark.parametrize(("mode", "backend", "device", "says"), [
    ("int8", "bitsandbytes", "cpu", "bitsandbytes, which needs a CUDA GPU .* torchao or quanto"),
    ("nf4", "auto", "cpu", "needs a CUDA GPU .* int4 with quantize_backend quanto"),
    ("nf4", "torchao", "cuda", "torchao does not offer .* set quantize_backend to bitsandbytes"),
    ("int4", "torchao", "cpu", "int4 kernels need a CUDA GPU, but the device is cpu; set quantize_backend to quanto"),
    ("int2", "auto", "cpu", "input quantize is 'int2'; expected one of none, int8, int4, fp8, nf4"),
    ("int8", "gptq", "cpu", "input quantize_backend is 'gptq'; expected one of auto, torchao, quanto, bitsandbytes"),
])
def test_what_cannot_be_done_here_is_refused_naming_an_alternative(mode: str, backend: str, device: str,
                                                                   says: str) -> None:
    with pytest.raises(QuantizationError, match=says):
        quantization(mode, backend, device)


def test_a_missing_backend_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from graphflow.models import quantization as module

    monkeypatch.setattr(module, "installed", lambda backend: False)
    with pytest.raises(QuantizationError, match=r"optimum-quanto package.*pip install 'graphflow\[quantize\]'"):
        quantization("int8", "quanto", "cpu")
    with pytest.raises(QuantizationError, match="bitsandbytes, which is not installed"):
        quantization("int8", "bitsandbytes", "cuda")
