"""Reading ``*.safetensors`` checkpoints with numpy alone (no torch), with one clear error per malformed file.

Format: an 8-byte little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets":
[begin, end)}, "__metadata__"?: {...}}``, then the data block the offsets point into. A sharded checkpoint lists
its files in ``model.safetensors.index.json`` (``{"weight_map": {name: file}}``).
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_header(path: str) -> tuple[dict, int]:
  """``({name: {"dtype", "shape", "data_offsets"}}, data start)`` of one file, each entry checked against the
  file's size."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
      raise ValueError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size} bytes)")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: unreadable safetensors header (not a JSON object)")
  header.pop("__metadata__", None)
  data_size = size - 8 - n
  for name, info in header.items():
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
      raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}")
    if info["dtype"] not in DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
    begin, end = info["data_offsets"]
    want = math.prod(info["shape"]) * np.dtype(DTYPES[info["dtype"]]).itemsize
    if end - begin != want:
      raise ValueError(f"{path}: tensor {name!r} of dtype {info['dtype']} and shape {info['shape']} needs {want} "
                       f"bytes; its offsets span {end - begin}")
    if not 0 <= begin <= end <= data_size:
      raise ValueError(f"{path}: truncated safetensors file (tensor {name!r} ends at byte {end} of a "
                       f"{data_size}-byte data block)")
  return header, 8 + n


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of one file as a numpy array of its stored dtype (memory-mapped, read-only)."""
  header, start = read_header(path)
  if not header:
    return {}
  data = np.memmap(path, dtype=np.uint8, mode="r")
  out = {}
  for name, info in header.items():
    begin, end = info["data_offsets"]
    out[name] = data[start + begin:start + end].view(DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def checkpoint_files(directory: str) -> list[str]:
  """The safetensors files of a checkpoint directory: those its index lists, or ``model.safetensors``, or every
  ``*.safetensors`` file."""
  index = os.path.join(directory, INDEX_FILE)
  if os.path.isfile(index):
    weight_map = _weight_map(index)
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
      raise ValueError(f"{index} lists shard(s) that are missing: {missing}")
    return [os.path.join(directory, f) for f in files]
  if os.path.isfile(os.path.join(directory, SINGLE_FILE)):
    return [os.path.join(directory, SINGLE_FILE)]
  files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  if not files:
    raise ValueError(f"{directory} has no weights: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file "
                     "(attnlab.pretrained.load_hf reads a pytorch_model.bin instead, with torch)")
  return [os.path.join(directory, f) for f in files]


def _weight_map(index: str) -> dict[str, str]:
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{index}: unreadable shard index ({e!r})") from None
  if not isinstance(weight_map, dict):
    raise ValueError(f"{index}: weight_map is not a mapping")
  return weight_map


def load_checkpoint(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint in ``directory``, by name; a name in two files, or one the shard index puts
  in another file than the one that holds it, is an error."""
  tensors: dict[str, np.ndarray] = {}
  where: dict[str, str] = {}
  for path in checkpoint_files(directory):
    for name, arr in read_safetensors(path).items():
      if name in tensors:
        raise ValueError(f"tensor {name!r} is stored twice: in {where[name]} and {path}")
      tensors[name], where[name] = arr, path
  index = os.path.join(directory, INDEX_FILE)
  if os.path.isfile(index):
    for name, file in _weight_map(index).items():
      if name not in tensors:
        raise ValueError(f"{index} maps tensor {name!r} to {file}, which does not contain it")
      if os.path.basename(where[name]) != os.path.basename(file):
        raise ValueError(f"{index} maps tensor {name!r} to {file}, but it is in {where[name]}")
  return tensors


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes ``tensors`` (numpy arrays of a dtype in ``DTYPES``) as one safetensors file."""
  names = {np.dtype(v): k for k, v in DTYPES.items()}
  header, offset, blobs = {}, 0, []
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    if arr.dtype not in names:
      raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
    blob = arr.tobytes()
    header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  if metadata:
    header["__metadata__"] = dict(metadata)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    for blob in blobs:
      f.write(blob)
