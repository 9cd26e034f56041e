"""The forward recorder: outputs only inside its block, hooks removed, clear errors for bad paths, every call
kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cwd_lightning.distill.recorder import ForwardRecorder


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Sequential(nn.ReLU(), nn.Conv2d(4, 5, 1)),
    )


def test_records_outputs_only_inside_the_block():
    net = _net()
    recorder = ForwardRecorder(net, ["0", "1.1"], side="student")
    x = torch.randn(2, 3, 8, 8)
    net(x)  # outside: nothing recorded
    assert recorder.outputs == {}
    with recorder:
        out = net(x)
    assert recorder.get("1.1") is not None
    torch.testing.assert_close(recorder.get("1.1"), out)
    assert recorder.get("0").shape == (2, 4, 8, 8)
    with recorder:  # a new step starts empty
        assert recorder.outputs == {"0": [], "1.1": []}


def test_hooks_are_removed_on_exit_even_after_an_error():
    net = _net()
    recorder = ForwardRecorder(net, ["0"])
    with pytest.raises(RuntimeError, match="boom"), recorder:
        assert len(net[0]._forward_hooks) == 1
        raise RuntimeError("boom")
    assert len(net[0]._forward_hooks) == 0
    assert not recorder.active


def test_bad_path_names_the_side_and_close_matches():
    net = nn.Module()
    net.decoder = nn.Sequential(nn.Conv2d(1, 1, 1))
    net.decoder_block = nn.Conv2d(1, 1, 1)
    with pytest.raises(ValueError, match=r"no module 'decoder.blok' in student; did you mean 'decoder_block'"):
        ForwardRecorder(net, ["decoder.blok"], side="student")
    with pytest.raises(ValueError, match=r"in teacher.*top-level modules: 'decoder', 'decoder_block'"):
        ForwardRecorder(net, ["zzz"], side="teacher")
    with pytest.raises(ValueError, match=r"no module 'out'.*write the path '/out' \(old form: '\[out\]'\)"):
        ForwardRecorder(net, ["out"], side="teacher")  # the old selector [out] in YAML is the list ['out']


def test_unused_module_gives_a_clear_error():
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _net()
            self.unused = nn.Conv2d(1, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    net = WithSpare()
    recorder = ForwardRecorder(net, ["unused"])
    with recorder:
        net(torch.randn(1, 3, 4, 4))
    with pytest.raises(RuntimeError, match=r"'unused'.*no output"):
        recorder.get("unused")


def test_recorder_keeps_every_call_and_never_picks_one_silently():
    shared = nn.Conv2d(3, 2, 1)
    recorder = ForwardRecorder(shared, [""], side="student")
    inputs = [torch.randn(1, 3, 4, 4) for _ in range(3)]
    with recorder:
        outputs = [shared(x) for x in inputs]
    assert len(recorder.calls("")) == 3
    torch.testing.assert_close(recorder.get("", 1), outputs[1])
    with pytest.raises(RuntimeError, match="ran 3 times; name the call"):
        recorder.get("")
    with pytest.raises(RuntimeError, match="there is no call 3"):
        recorder.get("", 3)


def test_an_output_changed_in_place_after_it_was_recorded_is_refused():
    """An inplace ReLU after the tapped conv turns the recorded tensor into the ReLU's output: reading it fails,
    naming the module; the ReLU's own output (the changed tensor) reads fine."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True))
    recorder = ForwardRecorder(net, ["0", "1"], side="teacher")
    with recorder:
        net(torch.randn(1, 3, 4, 4))
    with pytest.raises(RuntimeError, match=r"teacher module '0' was changed in place after it was recorded"):
        recorder.get("0")
    assert (recorder.get("1") >= 0).all()


def test_outputs_recorded_under_inference_mode_read_back():
    """Lightning validates under torch.inference_mode, whose tensors keep no version counter: they are read
    without the in-place check (validate used to fail with 'Inference tensors do not track version counter')."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    recorder = ForwardRecorder(net, ["0", "1"], side="teacher")
    with torch.inference_mode(), recorder:
        out = net(torch.randn(1, 3, 4, 4))
    assert recorder.get("0").is_inference() and recorder.get("0").shape == (1, 4, 4, 4)
    assert torch.equal(recorder.get("1"), out)
