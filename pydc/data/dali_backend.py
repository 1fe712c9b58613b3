"""The DALI backend: one DALI pipeline per loader, fed through fn.external_source.

Why external_source rather than fn.readers.file: the training order comes from a sampler every epoch
(DeepCluster's uniform sampler draws with replacement, so one file can appear several times in an epoch and
in a batch), and every output row must carry the exact dataset index of the file it came from (ODC writes
its memory by index). A file reader owns its order (its own shuffle, its own sharding, and a per-epoch file
list would need rebuilding the pipeline each epoch); feeding the encoded bytes from Python keeps the order
entirely ours: the loader keeps each row's dataset index, and each row's position travels through the
pipeline beside its image and is checked on the way out, so a row can never be paired with another index. The same feed carries the per-sample crop windows and flips computed in pydc.data.geometry, so
DALI and torchvision cut identical windows.

Decoding is device="mixed" (nvJPEG on the GPU) when the loader's device is CUDA, CPU decoding with
device_id=None otherwise. EXIF orientation is not applied (adjust_orientation=False), as in torchvision's
decoders and PIL's header sizes, so both backends see the same pixel grid and the same crop windows.

Bad files: DALI has no per-sample error handling; one undecodable sample (a truncated JPEG, text named .jpg)
raises out of pipeline.run() and leaves the pipeline unusable. So (1) every file is probed first
(pydc.data.decode.probe: empty, unidentifiable and oversized files never reach DALI), and (2) if a batch
still fails, the pipeline is rebuilt and that one batch is decoded by the torchvision backend, which reports
failures per sample. The files of such a batch go to torchvision from then on (DALI cannot say which sample
failed), and the loaders remember the files that failed everywhere, so later epochs pay for no rebuild.
"""

from __future__ import annotations

import numpy as np
import torch

from pydc.data.decode import ImageHeader
from pydc.data.geometry import CropWindows, feature_geometry
from pydc.data.torchvision_backend import TorchvisionBackend


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001  not installed, or installed without its CUDA libraries: no DALI here
        return False
    return True


class DaliBackend:
    name = "dali"

    def __init__(self, device: torch.device, num_threads: int, batch_size: int, seed: int = 0):
        if not dali_available():
            raise ImportError("backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                              "(or use backend='torchvision')")
        self.device = device
        self.num_threads = max(1, num_threads)
        self.batch_size = batch_size
        self.seed = seed
        self.fallback = TorchvisionBackend(device, num_threads)
        self.pipelines: dict[tuple[str, int], object] = {}
        self.fallback_batches = 0  # batches that DALI refused and torchvision decoded
        self.refused: set[int] = set()  # keys (dataset indices) of the samples of those batches

    def feature(self, headers: list[ImageHeader], size: int, keys=None):
        def dali_inputs(rows):
            geometry = np.array([feature_geometry(headers[r].height, headers[r].width, size) for r in rows],
                                dtype=np.float32).reshape(-1, 4)
            return {"resize_y": geometry[:, 0], "resize_x": geometry[:, 1], "anchor": geometry[:, 2:4]}

        def fallback(rows):
            return self.fallback.feature([headers[r] for r in rows], size)

        return self._run("feature", size, headers, keys, dali_inputs, fallback)

    def train(self, headers: list[ImageHeader], windows: CropWindows, size: int, keys=None):
        def dali_inputs(rows):
            return {"anchor": np.stack([windows.top[rows], windows.left[rows]], axis=1).astype(np.float32),
                    "shape": np.stack([windows.height[rows], windows.width[rows]], axis=1).astype(np.float32),
                    "flip": windows.flip[rows].astype(np.int32)}

        def fallback(rows):
            return self.fallback.train([headers[r] for r in rows], windows.select(rows), size)

        return self._run("train", size, headers, keys, dali_inputs, fallback)

    def _run(self, kind, size, headers, keys, dali_inputs, fallback):
        """(images of the rows that decoded, in row order; {row: reason} for the others).

        Rows whose key is in `refused` skip DALI. If DALI fails on a batch, its rows' keys join `refused` and
        torchvision decodes them, so a file DALI cannot read costs one pipeline rebuild, not one per epoch.
        """
        keys = list(range(len(headers))) if keys is None else list(keys)
        rows = np.arange(len(headers), dtype=np.int64)
        use_dali = np.array([key not in self.refused for key in keys], dtype=bool)
        decoded: dict[int, torch.Tensor] = {}
        if use_dali.any():
            dali_rows = rows[use_dali]
            images = self._run_dali(kind, size, [headers[r] for r in dali_rows], dali_inputs(dali_rows))
            if images is None:
                self.refused.update(keys[r] for r in dali_rows.tolist())
                use_dali[:] = False
            else:
                decoded.update(zip(dali_rows.tolist(), images.unbind(0)))
        failed: dict[int, str] = {}
        other_rows = rows[~use_dali]
        if len(other_rows):
            images, other_failed = fallback(other_rows)
            failed = {int(other_rows[position]): reason for position, reason in other_failed.items()}
            good = [r for r in other_rows.tolist() if r not in failed]
            if images is not None:
                decoded.update(zip(good, images.unbind(0)))
        if not decoded:
            return None, failed
        if len(decoded) == len(rows) and use_dali.all():
            return images, failed  # the common case: one DALI batch, no copy
        return torch.stack([decoded[r] for r in sorted(decoded)]), failed

    def _run_dali(self, kind, size, headers, inputs) -> torch.Tensor | None:
        """(B, 3, size, size) uint8 from DALI, or None when DALI refused the batch (the pipeline is then rebuilt)."""
        pipeline = self._pipeline(kind, size)
        rows = np.arange(len(headers), dtype=np.int64)
        try:
            pipeline.feed_input("encoded", [np.frombuffer(h.data, dtype=np.uint8) for h in headers])
            pipeline.feed_input("rows", [np.array(row) for row in rows])
            for name, values in inputs.items():  # one array per sample: 0-d for scalars, 1-d for pairs
                pipeline.feed_input(name, [np.array(value) for value in values])
            images, out_rows = pipeline.run()
        except Exception:  # noqa: BLE001  DALI raises RuntimeError/IndexError/... and the pipeline is dead
            del self.pipelines[(kind, size)]
            self.fallback_batches += 1
            return None
        returned_rows = _to_torch(out_rows, torch.device("cpu")).reshape(-1)
        if not torch.equal(returned_rows, torch.from_numpy(rows)):
            raise RuntimeError(f"DALI returned rows {returned_rows.tolist()} for rows {rows.tolist()}")
        return _to_torch(images, self.device).permute(0, 3, 1, 2).contiguous()  # from (B, size, size, 3)

    def _pipeline(self, kind: str, size: int):
        key = (kind, size)
        if key not in self.pipelines:
            build = _feature_pipeline if kind == "feature" else _train_pipeline
            on_gpu = self.device.type == "cuda"
            device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
                if on_gpu else None
            pipeline = build(size=size, on_gpu=on_gpu, batch_size=self.batch_size, num_threads=self.num_threads,
                             device_id=device_id, seed=self.seed, prefetch_queue_depth=1, exec_dynamic=True)
            pipeline.build()
            self.pipelines[key] = pipeline
        return self.pipelines[key]

    def close(self):
        self.pipelines.clear()
        self.fallback.close()


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dense, out, cuda_stream=stream)
    return out


def _feature_pipeline(size: int, on_gpu: bool, **pipeline_args):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(**pipeline_args)
    def feature_pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        rows = fn.external_source(name="rows", dtype=types.INT64)
        resize_y = fn.external_source(name="resize_y", dtype=types.FLOAT)
        resize_x = fn.external_source(name="resize_x", dtype=types.FLOAT)
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT)
        images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                   adjust_orientation=False)
        images = fn.resize(images, resize_y=resize_y, resize_x=resize_x, antialias=True,
                           interp_type=types.INTERP_LINEAR)
        images = fn.slice(images, anchor, np.array([size, size], dtype=np.float32), axes=[0, 1],
                          normalized_anchor=False, normalized_shape=False)
        return images, rows

    return feature_pipeline()


def _train_pipeline(size: int, on_gpu: bool, **pipeline_args):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(**pipeline_args)
    def train_pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        rows = fn.external_source(name="rows", dtype=types.INT64)
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT)
        shape = fn.external_source(name="shape", dtype=types.FLOAT)
        flip = fn.external_source(name="flip", dtype=types.INT32)
        # ROI decoding: only the window is decoded (nvJPEG/libjpeg-turbo skip the rest where they can).
        images = fn.decoders.image_slice(encoded, anchor, shape, axes=[0, 1], normalized_anchor=False,
                                         normalized_shape=False, device="mixed" if on_gpu else "cpu",
                                         output_type=types.RGB, adjust_orientation=False)
        images = fn.resize(images, size=[size, size], antialias=True, interp_type=types.INTERP_LINEAR)
        images = fn.flip(images, horizontal=flip)
        return images, rows

    return train_pipeline()
