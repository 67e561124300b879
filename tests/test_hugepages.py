import mmap
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from dfplan.errors import DfplanError
from dfplan.hugepages import HUGE, read_tensors, safetensors_index

G = torch.Generator().manual_seed(11)


def _file(tmp_path):
    ts = {"a.bits": torch.randint(0, 256, (37, 13), dtype=torch.uint8, generator=G),
          "b.q": torch.randint(-128, 128, (5000,), dtype=torch.int8, generator=G),
          "c.scale": torch.randn(7, 3, generator=G).half(),
          "d.empty": torch.empty(0, 4, dtype=torch.int8)}
    path = tmp_path / "w.safetensors"
    save_file(ts, str(path), metadata={"k": "v"})
    return path, ts


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE on this platform")
def test_read_tensors_equal_the_file_in_one_aligned_mapping(tmp_path, monkeypatch):
    monkeypatch.delenv("DFPLAN_HUGEPAGES", raising=False)
    path, ts = _file(tmp_path)
    got = read_tensors(path, ["b.q", "a.bits", "c.scale", "d.empty"])
    for k, t in ts.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    # the first tensor starts on a 2 MB boundary, the rest on cache lines
    assert got["b.q"].data_ptr() % HUGE == 0
    assert got["a.bits"].data_ptr() % 64 == 0
    # writable, separate storages: saving them again sees no shared memory
    got["a.bits"][0, 0] ^= 1
    assert not torch.equal(got["a.bits"], ts["a.bits"])
    save_file({k: got[k] for k in ("a.bits", "b.q")}, str(tmp_path / "again.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "again.safetensors"))["b.q"], ts["b.q"])


def test_switched_off_and_bad_files(tmp_path, monkeypatch):
    path, _ = _file(tmp_path)
    monkeypatch.setenv("DFPLAN_HUGEPAGES", "0")
    assert read_tensors(path, ["a.bits"]) == {}
    monkeypatch.delenv("DFPLAN_HUGEPAGES")
    start, index = safetensors_index(path)
    assert set(index) == {"a.bits", "b.q", "c.scale", "d.empty"} and start > 8
    short = tmp_path / "short.safetensors"
    short.write_bytes(path.read_bytes()[:start + 100])
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with pytest.raises(DfplanError, match="truncated"):
            read_tensors(short, ["b.q"])
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 7)
    with pytest.raises(DfplanError, match="too short"):
        safetensors_index(tmp_path / "junk.safetensors")


def _mapping_of(t: torch.Tensor) -> str | None:
    """Path of the /proc/self/maps mapping holding t's data ("" for anonymous memory)."""
    addr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return parts[5] if len(parts) > 5 else ""
    return None


def test_packed_load_with_and_without_huge_pages(tmp_path, monkeypatch):
    """The loaded model is the same either way, and re-saving it reproduces the file."""
    import dfplan
    from dfplan.config import Mamba2Config
    from dfplan.model import build_model
    from dfplan.packed import load_packed
    from dfplan.packed_files import WEIGHTS
    cfg = Mamba2Config(d_model=64, n_layer=2, vocab_size=256, d_state=16, headdim=16, chunk_size=16)
    m = build_model(cfg, seed=0).eval()
    dfplan.compress(m, "layout:dfssm")
    dfplan.save_packed(m, tmp_path / "p")
    monkeypatch.setenv("DFPLAN_HUGEPAGES", "0")
    plain = load_packed(tmp_path / "p")
    monkeypatch.delenv("DFPLAN_HUGEPAGES")
    huge = load_packed(tmp_path / "p")
    a, b = plain.state_dict(), huge.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if os.path.exists("/proc/self/maps") and hasattr(mmap, "MADV_HUGEPAGE"):
        bits = "backbone.layers.0.mixer.in_proj.bits"
        assert _mapping_of(plain.get_buffer(bits)).endswith(WEIGHTS)     # the file mmap
        assert _mapping_of(huge.get_buffer(bits)) == ""                  # the anonymous arena
    ids = torch.randint(0, 256, (1, 9), generator=G)
    with torch.no_grad():
        assert torch.equal(plain(ids), huge(ids))
    dfplan.save_packed(huge, tmp_path / "q")
    assert (tmp_path / "q" / WEIGHTS).read_bytes() == (tmp_path / "p" / WEIGHTS).read_bytes()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps") or not hasattr(mmap, "MADV_HUGEPAGE"),
                    reason="needs Linux /proc and MADV_HUGEPAGE")
def test_untied_embedding_stays_file_mapped(tmp_path, monkeypatch):
    """Decode reads only its tokens' rows of an untied embedding: it stays in the file mmap
    (off the resident set), while the lm_head, read in full, goes to the arena."""
    import dfplan
    from dfplan.config import Mamba2Config
    from dfplan.model import build_model
    from dfplan.packed import load_packed
    from dfplan.packed_files import WEIGHTS
    monkeypatch.delenv("DFPLAN_HUGEPAGES", raising=False)
    cfg = Mamba2Config(d_model=64, n_layer=2, vocab_size=256, d_state=16, headdim=16, chunk_size=16,
                       tie_embeddings=False)
    m = build_model(cfg, seed=0).eval()
    dfplan.compress(m, "layout:dfssm")
    dfplan.save_packed(m, tmp_path / "p")
    got = load_packed(tmp_path / "p")
    emb = [t for n, t in got.named_buffers() if n.startswith("backbone.embedding.")]
    head = [t for n, t in got.named_buffers() if n.startswith("lm_head.")]
    assert emb and head
    assert all(_mapping_of(t).endswith(WEIGHTS) for t in emb)
    assert all(_mapping_of(t) == "" for t in head)
    with torch.no_grad():
        ids = torch.randint(0, 256, (1, 7), generator=G)
        assert torch.equal(got(ids), m(ids))
