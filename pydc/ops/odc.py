"""The ODC memory ops: `torch.ops.pydc.odc_update_samples`, `odc_class_sums`, `odc_centroids_from_sums`.

Online Deep Clustering keeps a feature bank (N x D, rows L2-normalised), a label bank (N, int64), class counts
(K, int64), centroids (K x D) and, in pydc, fixed-point class sums (K x D, int64) that make the per-class mean
cheap and exactly reproducible. Semantics (MMSelfSup's odc_memory.py, made deterministic), which the
`*_reference` functions spell out in plain torch:

odc_update_samples(feature_bank, label_bank, counts, class_sums, centroids, indices, features, momentum)
    For each batch row j, in batch order (so a memory index that occurs several times in one batch is
    updated once per occurrence, each update starting from the previous one's result):
      f = x_j / (||x_j|| + 1e-10);  v = (1 - m) * bank[i] + m * f;  bank[i] = v / (||v|| + 1e-10)
    computed in float64 and rounded to the bank's dtype once (features are first cast to that dtype).
    The row's label becomes argmax_k centroids[k] . bank[i] with the dot products exact to float64 accuracy
    and ties going to the lowest k; every occurrence whose new label differs from the row's current label
    counts as one change. counts and class_sums follow the net move of each row. Returns the number of
    changes (int64, 0-dim); MMSelfSup's change ratio is that number over the batch size. A GEMM value that is
    NaN never wins the argmax (a row whose values are all NaN gets class 0), as the CPU's row_max does.
    An index outside [0, N), or an indexed row whose label is outside [0, K), refuses the whole batch before
    anything changes: the CPU kernel raises; the CUDA kernels check on the device (no host sync, no device
    assert) and return -(status bits): -1 for an index, -2 for a label, -3 for both. The wrapper
    odc_update_samples raises IndexError / ValueError for them (check=True, one host sync on CUDA); with
    check=False it returns the count as it is, and ChangeTally sums counts on the device and raises when read.
odc_class_sums(feature_bank, label_bank, class_sums, counts)
    A label outside [0, K) is refused before anything changes (RuntimeError naming the first such row, on
    every device: a whole-bank recount can afford the CUDA kernel's one host sync for that check).
    counts = bincount(labels); class_sums[k] = sum over rows of class k of round(row * 2^bits), with
    bits = min(50, 62 - bit_length(N)) so that no sum of rows of norm <= 1 can overflow.
odc_centroids_from_sums(class_sums, counts, centroids, bank_length)
    centroids[k] = class_sums[k] / 2^bits / counts[k] (float64, rounded once); a class with no member keeps
    its centroid. This equals the per-class mean of the bank rows to within 2^-bits (2^-41 for ImageNet), and
    because integer sums do not depend on the order of addition it is bitwise identical on every device,
    thread count and update history.
"""

from __future__ import annotations

import torch

from pydc.ops._registry import HAS_OPS, warn_fallback

NORM_EPS = 1e-10
_BANK_DTYPES = (torch.float32, torch.float64)


def fixed_point_bits(bank_length: int) -> int:
    """Fractional bits of the fixed-point class sums of a bank of `bank_length` rows."""
    return min(50, 62 - int(bank_length).bit_length())


def quantize_rows(rows: torch.Tensor, bank_length: int) -> torch.Tensor:
    """Rows as fixed-point int64 (round half to even, as the kernels do)."""
    return torch.round(rows.double() * 2.0 ** fixed_point_bits(bank_length)).long()


def centroids_from_class_sums(class_sums: torch.Tensor, counts: torch.Tensor, bank_length: int,
                              dtype: torch.dtype) -> torch.Tensor:
    """Per-class means from the fixed-point sums, with the kernels' arithmetic (sum * 2^-bits / count)."""
    inv_scale = 2.0 ** -fixed_point_bits(bank_length)
    return (class_sums.double() * inv_scale / counts.double().unsqueeze(1)).to(dtype)


def _fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def _check_bank(op, feature_bank, label_bank):
    if not isinstance(feature_bank, torch.Tensor) or feature_bank.dim() != 2:
        _fail(op, f"expected feature_bank to be a 2-D (N, D) tensor, got {_describe(feature_bank)}")
    if feature_bank.dtype not in _BANK_DTYPES:
        _fail(op, f"expected feature_bank of dtype float32 or float64, got {feature_bank.dtype}")
    if not feature_bank.is_contiguous():
        _fail(op, "expected a contiguous feature_bank (it is updated in place)")
    length = feature_bank.shape[0]
    if label_bank.dim() != 1 or label_bank.dtype != torch.int64 or label_bank.shape[0] != length:
        _fail(op, f"expected label_bank of dtype int64 and shape ({feature_bank.shape[0]},), got "
                  f"{_describe(label_bank)}")


def _check_class_state(op, feature_bank, counts, class_sums, num_classes):
    if counts.dim() != 1 or counts.dtype != torch.int64 or counts.shape[0] != num_classes:
        _fail(op, f"expected counts of dtype int64 and shape ({num_classes},), got {_describe(counts)}")
    expected = (num_classes, feature_bank.shape[1])
    if class_sums.dtype != torch.int64 or tuple(class_sums.shape) != expected:
        _fail(op, f"expected class_sums of dtype int64 and shape {expected}, got {_describe(class_sums)}")


def _check_devices(op, **tensors):
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        _fail(op, f"expected every tensor on one device, got {devices}")


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def check_update_samples(feature_bank, label_bank, counts, class_sums, centroids, indices, features,
                         momentum):
    op = "odc_update_samples"
    _check_bank(op, feature_bank, label_bank)
    if centroids.dim() != 2 or centroids.shape[1] != feature_bank.shape[1] or centroids.shape[0] == 0:
        _fail(op, f"expected centroids of shape (num_classes, {feature_bank.shape[1]}), got "
                  f"{_describe(centroids)}")
    if centroids.dtype != feature_bank.dtype:
        _fail(op, f"expected centroids of the feature_bank's dtype {feature_bank.dtype}, got "
                  f"{centroids.dtype}")
    _check_class_state(op, feature_bank, counts, class_sums, centroids.shape[0])
    if indices.dim() != 1 or indices.dtype != torch.int64:
        _fail(op, f"expected indices to be a 1-D int64 tensor, got {_describe(indices)}")
    if features.dim() != 2 or tuple(features.shape) != (indices.shape[0], feature_bank.shape[1]):
        _fail(op, f"expected features of shape ({indices.shape[0]}, {feature_bank.shape[1]}) "
                  "(one row per index), "
                  f"got {_describe(features)}")
    if not features.dtype.is_floating_point:
        _fail(op, f"expected floating-point features, got {features.dtype}")
    if not 0.0 <= float(momentum) <= 1.0:
        _fail(op, f"expected momentum in [0, 1], got {momentum}")
    _check_devices(op, feature_bank=feature_bank, label_bank=label_bank, counts=counts, class_sums=class_sums,
                   centroids=centroids, indices=indices, features=features)


def odc_update_samples_reference(feature_bank, label_bank, counts, class_sums, centroids, indices, features,
                                 momentum: float) -> torch.Tensor:
    """The documented update with torch ops: occurrence r of every index is applied in round r."""
    check_update_samples(feature_bank, label_bank, counts, class_sums, centroids, indices, features, momentum)
    length = feature_bank.shape[0]
    changes = torch.zeros((), dtype=torch.int64, device=feature_bank.device)
    if indices.numel() == 0:
        return changes
    if bool(((indices < 0) | (indices >= length)).any()):
        raise IndexError(f"odc_update_samples: indices must lie in [0, {length}), got {indices.tolist()}")
    features = features.to(feature_bank.dtype).double()
    sorted_indices, order = torch.sort(indices, stable=True)
    is_start = torch.ones_like(sorted_indices, dtype=torch.bool)
    is_start[1:] = sorted_indices[1:] != sorted_indices[:-1]
    starts = is_start.nonzero().squeeze(1)
    group = torch.cumsum(is_start.long(), 0) - 1
    occurrence = torch.empty_like(indices)
    occurrence[order] = torch.arange(indices.numel(), device=indices.device) - starts[group]

    unique = sorted_indices[starts]
    old_rows = feature_bank[unique].clone()
    old_labels = label_bank[unique].clone()
    centroids64 = centroids.double()
    for rank in range(int(occurrence.max()) + 1):
        positions = (occurrence == rank).nonzero().squeeze(1)  # distinct indices, batch order
        rows = indices[positions]
        x = features[positions]
        f = x / (x.norm(dim=1, keepdim=True) + NORM_EPS)
        v = (1.0 - momentum) * feature_bank[rows].double() + momentum * f
        feature_bank[rows] = (v / (v.norm(dim=1, keepdim=True) + NORM_EPS)).to(feature_bank.dtype)
        scores = feature_bank[rows].double() @ centroids64.t()
        scores = torch.nan_to_num(scores, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
        new_labels = torch.argmax(scores, dim=1)  # first max on ties; NaN never wins (all NaN: class 0)
        changes += (new_labels != label_bank[rows]).sum()
        label_bank[rows] = new_labels
    final_labels = label_bank[unique]
    ones = torch.ones_like(unique)
    counts.index_add_(0, old_labels, -ones)
    counts.index_add_(0, final_labels, ones)
    class_sums.index_add_(0, old_labels, -quantize_rows(old_rows, length))
    class_sums.index_add_(0, final_labels, quantize_rows(feature_bank[unique], length))
    return changes


def odc_class_sums_reference(feature_bank, label_bank, class_sums, counts) -> None:
    _check_bank("odc_class_sums", feature_bank, label_bank)
    _check_class_state("odc_class_sums", feature_bank, counts, class_sums, counts.shape[0])
    counts.copy_(torch.bincount(label_bank, minlength=counts.shape[0]))
    class_sums.zero_().index_add_(0, label_bank, quantize_rows(feature_bank, feature_bank.shape[0]))


def odc_centroids_from_sums_reference(class_sums, counts, centroids, bank_length: int) -> None:
    if centroids.dim() != 2 or centroids.dtype not in _BANK_DTYPES:
        _fail("odc_centroids_from_sums",
              f"expected 2-D float32 or float64 centroids, got {_describe(centroids)}")
    _check_class_state("odc_centroids_from_sums", centroids, counts, class_sums, centroids.shape[0])
    filled = counts > 0
    means = centroids_from_class_sums(class_sums, counts, bank_length, centroids.dtype)
    centroids.copy_(torch.where(filled.unsqueeze(1), means, centroids))


# Status bits of a batch the CUDA kernels refused (csrc/common/odc_math.h); the op returns -(bits).
INDEX_OUT_OF_RANGE = 1
LABEL_OUT_OF_RANGE = 2


def raise_if_refused(changes, bank_length: int, num_classes: int, op: str = "odc_update_samples") -> int:
    """The change count as an int (a host sync on CUDA), or IndexError / ValueError for a refused batch."""
    count = int(changes)
    if count >= 0:
        return count
    bits = -count
    if bits & INDEX_OUT_OF_RANGE:
        raise IndexError(f"{op}: indices must lie in [0, {bank_length}); the batch was refused and the memory is "
                         "unchanged")
    if bits & LABEL_OUT_OF_RANGE:
        raise ValueError(f"{op}: a row of the batch has a label outside [0, {num_classes}) in label_bank (the "
                         "memory was not initialised, or its labels were overwritten); the batch was refused and "
                         "the memory is unchanged")
    raise RuntimeError(f"{op}: the kernel returned {count}, which is no known status")


class ChangeTally:
    """Change counts of many steps, summed on their device: no host sync per step (add), one when read (total).

    A refused batch changed nothing; total() then raises the error that odc_update_samples(check=True) would
    have raised at that step, once (later steps were applied normally). Use it with
    odc_update_samples(..., check=False) in a training loop and read it where the loop logs.
    """

    def __init__(self, bank_length: int, num_classes: int):
        self.bank_length, self.num_classes = int(bank_length), int(num_classes)
        self.reset()

    def reset(self) -> None:
        self._changes = None  # int64 on the device: sum of the counts of accepted batches
        self._status = None   # int64 on the device: OR of the status bits of refused batches
        self.rows = 0         # rows of every batch added (a host number: no sync)

    def add(self, changes: torch.Tensor, rows: int) -> None:
        accepted = changes.clamp(min=0)
        status = (-changes).clamp(min=0)
        self._changes = accepted if self._changes is None else self._changes + accepted
        self._status = status if self._status is None else self._status.bitwise_or(status)
        self.rows += int(rows)

    def total(self) -> int:
        """Changes since the last reset (one host sync); raises for a refused batch, then forgets it."""
        if self._changes is None:
            return 0
        status = int(self._status)
        if status:
            self._status.zero_()
            raise_if_refused(-status, self.bank_length, self.num_classes)
        return int(self._changes)

    def ratio(self) -> float:
        """Changes per row added since the last reset (MMSelfSup's change ratio over many steps)."""
        changes = self.total()
        return changes / self.rows if self.rows else 0.0


def odc_update_samples(feature_bank, label_bank, counts, class_sums, centroids, indices, features,
                       momentum: float = 0.5, *, check: bool = True) -> torch.Tensor:
    """Blend a batch into the memory in place; returns the number of label changes (see module docstring).

    check=True raises IndexError / ValueError for a batch the CUDA kernels refused (a host sync per call on
    CUDA); check=False returns the device count as it is (negative for a refused batch), for ChangeTally.
    The CPU kernel raises for such batches either way.
    """
    check_update_samples(feature_bank, label_bank, counts, class_sums, centroids, indices, features, momentum)
    if not HAS_OPS:
        warn_fallback("odc_update_samples")
        return odc_update_samples_reference(feature_bank, label_bank, counts, class_sums, centroids, indices,
                                            features, momentum)
    changes = torch.ops.pydc.odc_update_samples(feature_bank, label_bank, counts, class_sums, centroids, indices,
                                                features, float(momentum))
    if check:
        raise_if_refused(changes, feature_bank.shape[0], centroids.shape[0])
    return changes


def odc_class_sums(feature_bank, label_bank, class_sums, counts) -> None:
    """Recompute counts and fixed-point class sums from the whole bank, in place."""
    _check_bank("odc_class_sums", feature_bank, label_bank)
    _check_class_state("odc_class_sums", feature_bank, counts, class_sums, counts.shape[0])
    _check_devices("odc_class_sums", feature_bank=feature_bank, label_bank=label_bank, class_sums=class_sums,
                   counts=counts)
    if not HAS_OPS:
        warn_fallback("odc_class_sums")
        return odc_class_sums_reference(feature_bank, label_bank, class_sums, counts)
    torch.ops.pydc.odc_class_sums(feature_bank, label_bank, class_sums, counts)


def odc_centroids_from_sums(class_sums, counts, centroids, bank_length: int) -> None:
    """centroids[k] = per-class mean from the fixed-point sums, in place; empty classes keep theirs."""
    if centroids.dim() != 2 or centroids.dtype not in _BANK_DTYPES or not centroids.is_contiguous():
        _fail("odc_centroids_from_sums",
              f"expected contiguous 2-D float32 or float64 centroids, got {_describe(centroids)}")
    _check_class_state("odc_centroids_from_sums", centroids, counts, class_sums, centroids.shape[0])
    _check_devices("odc_centroids_from_sums", class_sums=class_sums, counts=counts, centroids=centroids)
    if not HAS_OPS:
        warn_fallback("odc_centroids_from_sums")
        return odc_centroids_from_sums_reference(class_sums, counts, centroids, bank_length)
    torch.ops.pydc.odc_centroids_from_sums(class_sums, counts, centroids, int(bank_length))


if HAS_OPS:

    @torch.library.register_fake("pydc::odc_update_samples")
    def _odc_update_samples_fake(feature_bank, label_bank, counts, class_sums, centroids, indices, features,
                                 momentum):
        torch._check(feature_bank.dim() == 2, lambda: "odc_update_samples: feature_bank must be 2-D")
        torch._check(features.shape[0] == indices.shape[0],
                     lambda: "odc_update_samples: one feature row per index")
        torch._check(centroids.shape[1] == feature_bank.shape[1], lambda: "odc_update_samples: centroid size")
        return feature_bank.new_empty((), dtype=torch.int64)

    @torch.library.register_fake("pydc::odc_class_sums")
    def _odc_class_sums_fake(feature_bank, label_bank, class_sums, counts):
        torch._check(class_sums.shape[1] == feature_bank.shape[1], lambda: "odc_class_sums: class_sums size")
        return None

    @torch.library.register_fake("pydc::odc_centroids_from_sums")
    def _odc_centroids_from_sums_fake(class_sums, counts, centroids, bank_length):
        torch._check(class_sums.shape == centroids.shape, lambda: "odc_centroids_from_sums: shapes differ")
        return None
