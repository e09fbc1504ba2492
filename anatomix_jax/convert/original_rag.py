"""The original AnatomiX's sentence database file, ``emb_db.pt``, in and out.

``src/rag/create_rag_db.py`` saves (``torch.save``) an ``OrderedDict`` anatomy name → ``OrderedDict``
sentence → that sentence's projected text embedding, a float tensor ``[1, proj_dim]`` (the trained
projection head's output, not normalised): anatomies in the order the scene graphs first name them,
sentences sorted within each. Its retrieval (``APMModel.retrieve_rag_sentences``) pairs decoder
query ``i`` with the ``i``-th anatomy name in sorted order, which is this project's anatomy order
(``anatomy.ANATOMY_NAMES``), and takes the arg-max cosine.

Read through torch's weights-only unpickler (``convert.tensors.read_torch_file``): nothing but
tensors, builtins and ``OrderedDict`` is unpickled.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping, Sequence

import numpy as np

from anatomix_jax import anatomy
from anatomix_jax.convert.tensors import key_list, read_torch_file, to_numpy


def read_emb_db(path: str | os.PathLike, anatomies: Sequence[str] = anatomy.ANATOMY_NAMES
                ) -> tuple[tuple[tuple[str, ...], ...], tuple[np.ndarray, ...]]:
  """Reads an ``emb_db.pt`` and puts its tables in the order of ``anatomies``.

  Args:
    path: the file.
    anatomies: the expected anatomy names (the original's, i.e. Chest ImaGenome object names).

  Returns:
    ``(sentences, embeddings)``: per anatomy of ``anatomies``, its sentences in the file's order
    and their embeddings float32 ``[S_i, d]`` as stored (not normalised).

  Raises:
    ValueError: naming the file and the entry: unreadable/truncated, a refused class, another
      anatomy list (the unknown and the missing names), a non-tensor embedding, or embeddings of
      different widths.
  """
  path = os.fspath(path)
  obj = read_torch_file(path)
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected emb_db.pt's dict anatomy name → {{sentence: embedding}}, "
                     f"got {type(obj).__name__}")
  bad = [k for k in obj if not isinstance(k, str)]
  if bad:
    raise ValueError(f"{path}: anatomy keys must be names (str), got {bad[:3]!r}")
  unknown = [k for k in obj if k not in anatomies]
  missing = [a for a in anatomies if a not in obj]
  if unknown or missing:
    raise ValueError(
        f"{path}: made for another anatomy list than this project's {len(anatomies)} "
        "(anatomix_jax/anatomy.py, the original's Chest ImaGenome names)"
        + (f"; unknown anatomies: {key_list(unknown)}" if unknown else "")
        + (f"; missing anatomies: {key_list(missing)}" if missing else ""))
  sentences, embeddings, width = [], [], None
  for name in anatomies:
    table = obj[name]
    if not isinstance(table, Mapping):
      raise ValueError(f"{path}: [{name!r}] is a {type(table).__name__}, expected a dict "
                       "sentence → embedding")
    rows = []
    for sentence, value in table.items():
      where = f"{path}: [{name!r}][{sentence!r}]"
      if not isinstance(sentence, str):
        raise ValueError(f"{where}: the sentence key is a {type(sentence).__name__}, expected str")
      if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise ValueError(f"{where} is a {type(value).__name__}, expected a tensor [1, d]")
      row = np.asarray(to_numpy(value), np.float32)
      if row.ndim == 2 and row.shape[0] == 1:
        row = row[0]
      if row.ndim != 1 or (width is not None and row.shape[0] != width):
        raise ValueError(f"{where} has shape {tuple(value.shape)}, expected [1, "
                         f"{width if width is not None else 'd'}]")
      width = row.shape[0]
      rows.append(row)
    sentences.append(tuple(table))
    embeddings.append(rows)
  if width is None:
    raise ValueError(f"{path}: holds no sentences")
  return tuple(sentences), tuple(np.stack(r) if r else np.zeros((0, width), np.float32)
                                 for r in embeddings)


def write_emb_db(path: str | os.PathLike, anatomies: Sequence[str],
                 sentences: Sequence[Sequence[str]], embeddings: Sequence[np.ndarray]) -> None:
  """Writes an ``emb_db.pt`` in the original's layout (each embedding a float32 ``[1, d]``).

  Args:
    path: the file (written beside as ``.tmp`` and renamed).
    anatomies: the anatomy names, in the order to store them.
    sentences: per anatomy, its sentences.
    embeddings: per anatomy, float ``[S_i, d]``, rows aligned with ``sentences``.
  """
  try:
    import torch  # noqa: PLC0415 (optional dependency)
  except ImportError as err:
    raise ValueError(f"{path}: writing emb_db.pt needs torch; install it") from err
  path = os.fspath(path)
  db = collections.OrderedDict()
  for name, texts, table in zip(anatomies, sentences, embeddings, strict=True):
    table = np.asarray(table, np.float32)
    if table.shape[0] != len(texts):
      raise ValueError(f"{path}: anatomy {name!r} has {len(texts)} sentences but "
                       f"{table.shape[0]} embeddings")
    db[name] = collections.OrderedDict(
        (s, torch.from_numpy(np.ascontiguousarray(row[None]))) for s, row in zip(texts, table))
  torch.save(db, path + ".tmp")
  os.replace(path + ".tmp", path)
