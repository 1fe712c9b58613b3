"""Deployment without Python model code: a model using SobelStem through torch.export and AOTInductor.

The exported program keeps `pydc.sobel_normalize` as one node (its fake kernel gives the shapes); the
AOTInductor package calls it through torch's op dispatcher, so the process that runs the package must load
the ops library first: `torch.ops.load_library` on pydc/_C*.so (or `import pydc`, or the CMake build's
libpydc_ops.so). The package is run in a fresh interpreter that loads nothing of pydc but that library, and
gives the eager result; without the library it fails and names the op.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from pydc import _C
from pydc.nn import SobelStem
from tests.conftest import cpu_and_cuda

# Inductor fuses and reorders the conv/pool/linear math: the compiled outputs match eager to float32 rounding.
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


class SobelNet(nn.Module):
    """DeepCluster's shape in miniature: the fixed Sobel stem, a conv block, pooling, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = SobelStem()
        self.body = nn.Sequential(nn.Conv2d(SobelStem.out_channels, 8, 3, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(images))


def _run_package(package: Path, inputs: Path, output: Path, *, load_library: bool, device: str):
    load = f"torch.ops.load_library({_C.__file__!r})" if load_library else "pass"
    script = textwrap.dedent(f"""
        import sys, torch
        {load}
        assert "pydc" not in sys.modules
        runner = torch._inductor.aoti_load_package({str(package)!r})
        inputs = torch.load({str(inputs)!r})
        torch.save([runner(images.to({device!r})).cpu() for images in inputs], {str(output)!r})
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=package.parent, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": ""})


@pytest.mark.slow
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_export_and_aoti_package_give_the_eager_result(device, tmp_path):
    torch.manual_seed(0)
    model = SobelNet().to(device).eval()
    with torch.no_grad():  # eval-mode batch norm with non-trivial statistics
        model.body[1].running_mean.uniform_(-0.5, 0.5)
        model.body[1].running_var.uniform_(0.5, 2.0)
    example = torch.randint(0, 256, (2, 3, 24, 20), dtype=torch.uint8, device=device)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (example,), dynamic_shapes={"images": {0: batch}})
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert "pydc.sobel_normalize.default" in targets, targets  # one fused node, not the reference's chain

    # A batch size other than the traced one goes through the dynamic dimension.
    inputs = [example, torch.randint(0, 256, (5, 3, 24, 20), dtype=torch.uint8, device=device)]
    with torch.no_grad():
        eager = [model(images) for images in inputs]
        from_export = [exported.module()(images) for images in inputs]
    for got, expected in zip(from_export, eager):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same kernels, run by the graph

    package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "sobel_net.pt2"))
    torch.save([images.cpu() for images in inputs], tmp_path / "inputs.pt")
    result = _run_package(Path(package), tmp_path / "inputs.pt", tmp_path / "aoti.pt", load_library=True,
                          device=device)
    assert result.returncode == 0, result.stderr[-4000:]
    for got, expected in zip(torch.load(tmp_path / "aoti.pt"), eager):
        torch.testing.assert_close(got, expected.cpu(), **TOLERANCE)

    # Without the ops library the package cannot run, and the error names the missing op.
    result = _run_package(Path(package), tmp_path / "inputs.pt", tmp_path / "unused.pt", load_library=False,
                          device=device)
    assert result.returncode != 0 and "sobel_normalize" in result.stderr, result.stderr[-4000:]
