"""Text documents from the embedded corpus, local files (text/JSONL/parquet) or the Hugging Face hub.

Local files are read with ``datasets`` in streaming mode (no Arrow cache is written, works fully offline; set
``HF_DATASETS_OFFLINE=1`` to also skip any DNS lookup). Hub datasets (e.g. ``HuggingFaceFW/fineweb-edu``,
``roneneldan/TinyStories``) are always streamed. Per-process sharding uses
``datasets.distributed.split_dataset_by_node`` (file-level when the number of files divides the process count).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

from attnlab.data.corpus import embedded_documents

TEXT_DOCUMENTS = ("paragraph", "line", "document", "size")  # how a plain-text file is cut into documents
_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
FILE_SOURCES = ("text", "json", "parquet")


def check_files(paths: tuple[str, ...]) -> None:
  if not paths:
    raise ValueError("no dataset files given (DataConfig.paths is empty)")
  for p in paths:
    if os.path.isdir(p):
      raise ValueError(f"dataset file {p!r} is a directory (DataConfig.paths lists files)")
    if not os.path.isfile(p):
      raise ValueError(f"dataset file {p!r} does not exist")
    if os.path.getsize(p) == 0:
      raise ValueError(f"dataset file {p!r} is empty")


def builder_for(source: str, paths: tuple[str, ...]) -> str:
  if source in FILE_SOURCES:
    return source
  exts = {os.path.splitext(p)[1].lower() for p in paths}
  builders = {_BUILDERS.get(e) for e in exts}
  if len(builders) != 1 or None in builders:
    raise ValueError(f"cannot infer the file format of {list(paths)}; set DataConfig.source to one of "
                     f"{FILE_SOURCES}")
  return builders.pop()


def split_by_size(text: str, doc_chars: int) -> list[str]:
  """``text`` cut into documents of about ``doc_chars`` characters, each ending at a line break where there is one
  in the second half of the piece (so a document rarely starts mid-line)."""
  if doc_chars < 1:
    raise ValueError(f"doc_chars must be positive; got {doc_chars}")
  out, start = [], 0
  while start < len(text):
    end = min(start + doc_chars, len(text))
    if end < len(text):
      cut = text.rfind("\n", start + doc_chars // 2, end)
      end = cut + 1 if cut >= 0 else end
    piece = text[start:end].strip()
    if piece:
      out.append(piece)
    start = end
  return out


def hf_documents(builder_or_name: str, *, data_files=None, config_name: str | None = None, split: str = "train",
                 text_field: str = "text", process_index: int = 0, process_count: int = 1,
                 shuffle_seed: int | None = None, shuffle_buffer: int = 1000, text_documents: str = "paragraph",
                 doc_chars: int = 4096) -> Iterator[str]:
  """Streams the ``text_field`` of a ``datasets`` source: a packaged builder on local files or a hub name.

  Plain-text files (builder ``text``) become documents by ``text_documents``: ``"paragraph"`` (split at blank
  lines), ``"line"`` (one per line), ``"document"`` (one per file) or ``"size"`` (each file cut into pieces of
  about ``doc_chars`` characters at line breaks, :func:`split_by_size`).
  """
  import datasets

  if text_documents not in TEXT_DOCUMENTS:
    raise ValueError(f"text_documents must be one of {TEXT_DOCUMENTS}; got {text_documents!r}")
  kwargs = {"data_files": list(data_files)} if data_files else {}
  if builder_or_name == "text":
    kwargs["sample_by"] = "document" if text_documents == "size" else text_documents
    if text_documents != "line":
      kwargs["keep_linebreaks"] = True
  ds = datasets.load_dataset(builder_or_name, config_name, split=split, streaming=True, **kwargs)
  if process_count > 1:
    from datasets.distributed import split_dataset_by_node
    ds = split_dataset_by_node(ds, rank=process_index, world_size=process_count)
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=shuffle_seed, buffer_size=shuffle_buffer)
  where = list(data_files) if data_files else builder_or_name
  examples = iter(ds)
  for i in itertools.count():
    try:
      ex = next(examples)
    except StopIteration:
      return
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, OSError) as e:
      if isinstance(e, ConnectionError) or not data_files:
        raise
      raise ValueError(f"dataset files {where} are malformed near example {i} ({' '.join(str(e).split())[:300]})") \
          from None
    except Exception as e:  # noqa: BLE001 (pyarrow / datasets parse errors have their own types)
      if not data_files:
        raise
      raise ValueError(f"dataset files {where} are malformed near example {i} ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:300]})") from None
    if text_field not in ex:
      raise ValueError(f"field {text_field!r} not in the dataset's examples (fields: {sorted(ex)}); set "
                       "DataConfig.text_field")
    value = ex[text_field]
    if not isinstance(value, str):
      raise ValueError(f"dataset {where}: example {i} has {text_field!r} = {value!r} ({type(value).__name__}); "
                       f"DataConfig.text_field must name a string field")
    if builder_or_name == "text" and text_documents == "size":
      yield from split_by_size(value, doc_chars)
    elif builder_or_name == "text" and text_documents == "paragraph":
      doc = value.strip()
      if doc:
        yield doc
    else:
      yield value


def local_documents(source: str, paths: tuple[str, ...], text_field: str = "text", *,
                    text_documents: str = "paragraph", doc_chars: int = 4096) -> list[str]:
  """Every document of local files, in file order (``text`` files: by ``text_documents``, see
  :func:`hf_documents`)."""
  check_files(paths)
  try:
    docs = [d for d in hf_documents(builder_for(source, paths), data_files=paths, text_field=text_field,
                                    text_documents=text_documents, doc_chars=doc_chars) if d]
  except Exception as e:  # noqa: BLE001 (datasets / pyarrow parse errors have many types)
    if type(e) is ValueError:  # noqa: E721 (ours, already naming the file; pyarrow's errors subclass ValueError)
      raise
    raise ValueError(f"dataset files {list(paths)} are malformed ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:300]})") from None
  if not docs:
    raise ValueError(f"dataset files {list(paths)} hold no non-empty documents")
  return docs


def heldout(docs: list[str], split: str, every: int) -> list[str]:
  """Deterministic held-out split by document index: every ``every``-th document is validation."""
  held = split == "validation"
  return [d for i, d in enumerate(docs) if (i % every == every // 2) == held]


def finite_documents(source: str, split: str, *, paths=(), eval_paths=(), text_field="text",
                     heldout_every=16, text_documents="paragraph", doc_chars=4096) -> list[str]:
  if source == "embedded":
    return embedded_documents(split)
  how = dict(text_documents=text_documents, doc_chars=doc_chars)
  if split == "validation" and eval_paths:
    return local_documents(source, tuple(eval_paths), text_field, **how)
  docs = local_documents(source, tuple(paths), text_field, **how)
  return docs if eval_paths else heldout(docs, split, heldout_every)
