"""One shard of `refbench prepare` written: a deterministic USTAR tar of `<key>.jpg` (the JPEG
bytes, checked) and `<key>.json` (the image's refs with their RLE masks and tokenized sentences), in
a worker process, under a temporary name (docs/shards.md, schema v1; refbench.data.prepare plans
the shards and commits them).

Per image: the JPEG's marker segments up to the frame header give its size (`jpeg_size`, ~3 us),
a scaled decode proves that every scan decodes (`jpeg_decode_problem`), each ref's polygon union
is rasterised to COCO RLE (pycocotools) and must not be empty. Tar members carry mtime 0, uid/gid
0, mode 0644, no user names, in sorted order: the same inputs give byte-identical tars.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from refbench.fsutil import TMP_PREFIX

SHARD_NAME = re.compile(r"^[A-Za-z0-9]+-\d{6}\.tar$")


# ---------------------------------------------------------------------------------- shard writing


_BLOCK, _RECORD = 512, 20 * 512  # tar block and record sizes (tarfile.BLOCKSIZE, tarfile.RECORDSIZE)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file as tarfile writes it for our members.

    Fixed metadata (docs/shards.md): mode 0644, uid/gid 0, mtime 0, no user/group names. Byte for
    byte what `tarfile.TarInfo(name).tobuf(tarfile.USTAR_FORMAT)` gives with those fields (a
    test checks it), at ~1/10 of its cost.
    """
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or size >= 8**11:
        raise ValueError(f"tar member {name!r} of {size} bytes does not fit a plain USTAR header")
    head = b"".join((
        encoded.ljust(100, b"\0"), b"0000644\0", b"0000000\0", b"0000000\0",  # name, mode, uid, gid
        b"%011o\0" % size, b"00000000000\0", b" " * 8, b"0",  # size, mtime, checksum (blank), type: file
        bytes(100), b"ustar\x0000", bytes(64 + 16 + 155 + 12),  # link, magic; names, device numbers, prefix: empty
    ))
    return head[:148] + b"%06o\0 " % sum(head) + head[156:]  # checksum: sum of bytes, field read as spaces


class _TarWriter:
    """A deterministic USTAR archive written straight to a file, hashed and counted on the way.

    Writes exactly the bytes `tarfile` writes for these members (header, data, NUL padding to
    512; at the end two zero blocks and padding to a 10240-byte record), without its per-member
    TarInfo copies and 16 KB chunking: one `write` per header, data and padding.
    """

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def _write(self, b: bytes) -> None:
        self.sha.update(b)
        self.f.write(b)
        self.n += len(b)

    def add(self, name: str, data: bytes) -> None:
        self._write(ustar_header(name, len(data)))
        self._write(data)
        if len(data) % _BLOCK:
            self._write(bytes(_BLOCK - len(data) % _BLOCK))

    def close(self) -> None:
        self._write(bytes(2 * _BLOCK))
        if self.n % _RECORD:
            self._write(bytes(_RECORD - self.n % _RECORD))


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # start-of-frame markers


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None if the bytes are not a JPEG.

    Walks the marker segments from SOI to the first start-of-frame (a few steps, ~10x cheaper
    than opening the image with pillow); the entropy-coded data is not read.
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        seg = int.from_bytes(data[i + 2:i + 4], "big")
        if seg < 2:
            return None
        if marker in _SOF:
            if i + 9 > n:
                return None
            h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return (w, h) if w > 0 and h > 0 else None
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        i += 2 + seg
    return None


def jpeg_decode_problem(data: bytes, width: int, height: int) -> str | None:
    """Why these JPEG bytes do not decode completely, or None when they do.

    Decodes with pillow (the loaders' decoder, so what passes here decodes there) at 1/8 scale in
    the DCT (`draft`): every scan is still entropy-decoded to its end, so a file cut short, a
    missing end-of-image marker or a broken Huffman stream fails here as it would in training,
    at about half the cost of a full decode. Recoverable
    libjpeg warnings ("corrupt data: N extraneous bytes", found in a few COCO images) pass, as
    they do in the loaders.
    """
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
            im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        return f"the JPEG does not decode completely ({type(e).__name__}: {e})"
    return None


def _read_jpeg(path: Path, image: dict) -> bytes:
    """The JPEG bytes of an image, after checking it: a JPEG of the annotated size that decodes
    completely (`jpeg_decode_problem`)."""
    from refbench.data.sources.refer import BadInput

    iid = image["image_id"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInput("image", iid, path, "file not found") from None
    except OSError as e:
        raise BadInput("image", iid, path, f"cannot read ({e.strerror})") from None
    size = jpeg_size(data)
    if size is None:
        raise BadInput("image", iid, path, "not a readable JPEG (no JPEG frame header)" if data else "empty file")
    if size != (image["width"], image["height"]):
        raise BadInput("image", iid, path, f"is {size[0]}x{size[1]} but instances.json says {image['width']}x{image['height']}")
    problem = jpeg_decode_problem(data, *size)
    if problem:
        raise BadInput("image", iid, path, problem)
    return data


def _target_rle(ref: dict, image: dict, instances: str) -> dict:
    """The ref's GT mask as COCO RLE, checked: it rasterises at the image's size and is not empty.

    Raises `BadInput` naming instances.json and the ref: a target of zero area would score IoU 0
    for every model (or be skipped by none), silently pulling mIoU down.
    """
    from refbench.data.sources.refer import BadInput, mask_area, mask_rle

    try:
        rle = mask_rle(ref["segmentation"], image["height"], image["width"])
    except Exception as e:  # pycocotools raises ValueError, TypeError, OverflowError on bad input
        raise BadInput("ref", ref["ref_id"], instances, f"ann_id {ref['ann_id']}: the segmentation does not rasterise ({e})") from None
    if mask_area(rle) == 0:
        raise BadInput("ref", ref["ref_id"], instances,
                       f"ann_id {ref['ann_id']}: the segmentation has zero area in the "
                       f"{image['width']}x{image['height']} image (no pixel to find)")
    return rle


_progress_queue = None  # in pool workers: a multiprocessing queue of (progress task id, images done)


def init_worker(queue) -> None:
    global _progress_queue
    _progress_queue = queue


def write_shard(task: dict) -> dict:
    """Write one shard to a temporary file in its split folder; returns its record and skips."""
    from refbench.data.sources import grefer
    from refbench.data.sources.refer import BadInput

    folder, images_dir, length = Path(task["folder"]), Path(task["images_dir"]), task["context_length"]
    report = task.get("report") or (lambda n: _progress_queue.put((task["progress_id"], n)))
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{task['split']}-", suffix=".tar", dir=folder)
    rec = {"split": task["split"], "tmp": tmp, "samples": 0, "refs": 0, "sentences": 0, "truncated": 0, "skipped": []}
    try:
        with os.fdopen(fd, "wb") as f:
            tar = _TarWriter(f)
            done = 0
            for image in task["images"]:
                done += 1
                if done % 16 == 0:
                    report(16)
                try:
                    jpg = _read_jpeg(images_dir / image["file_name"], image)
                except BadInput as e:
                    if not task["skip_bad"]:
                        raise
                    rec["skipped"].append(e.record())
                    continue
                refs, sentences, truncated = [], 0, 0
                for r in image["refs"]:
                    try:
                        mask = (grefer.target_rle if "targets" in r else _target_rle)(r, image, task["instances"])
                    except BadInput as e:
                        if not task["skip_bad"]:
                            raise
                        rec["skipped"].append(e.record())
                        continue
                    sents = [{"sent_id": s["sent_id"], "sent": s["sent"], "raw": s["raw"], "tokens": s["tokens"]}
                             for s in r["sentences"]]
                    refs.append({"ref_id": r["ref_id"], "ann_id": r["ann_id"], "category_id": r["category_id"],
                                 "bbox": r["bbox"], "split": r["split"], "mask": mask, "sentences": sents})
                    if "targets" in r:  # gRefCOCO: the no-target flag and every target (refbench.data.sources.grefer)
                        refs[-1].update(grefer.shard_fields(r))
                    sentences += len(sents)
                    truncated += sum(s["n_tokens"] > length for s in r["sentences"])
                if not refs:  # every ref of the image was skipped (each is listed)
                    continue
                rec["sentences"] += sentences
                rec["truncated"] += truncated
                sample = {"image_id": image["image_id"], "file_name": image["file_name"],
                          "height": image["height"], "width": image["width"], "refs": refs}
                key = f"{image['image_id']:012d}"
                tar.add(f"{key}.jpg", jpg)
                tar.add(f"{key}.json", json.dumps(sample, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
                rec["samples"] += 1
                rec["refs"] += len(refs)
            report(done % 16)
            tar.close()
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    rec["bytes"], rec["sha256"] = tar.n, tar.sha.hexdigest()
    return rec
