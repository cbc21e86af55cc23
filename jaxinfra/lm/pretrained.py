"""The LM job from a Hugging Face folder (`checkpoint.init_from=FOLDER`): the folder's architecture and tokenizer
fill the config where the user said nothing (a key they set that disagrees is one line naming both values), and
the run keeps a copy of the folder's config and tokenizer files (`RUN/source/`) for its exports. JAX-free: the
CLI applies it before any device is set up, so --print-config shows the model that will train."""
from __future__ import annotations

import dataclasses
import logging

from jaxinfra.core import storage
from jaxinfra.core.errors import UserError
from jaxinfra.hub import families
from jaxinfra.settings.sections import Config

log = logging.getLogger(__name__)


def with_folder(cfg: Config, given: set[str] | frozenset[str] = frozenset()) -> Config:
    """cfg with model.* and data.tokenizer from checkpoint.init_from when it is an HF folder (else cfg as is);
    `given`: the dotted keys the user set (settings.loading.given_keys)."""
    path = cfg.checkpoint.init_from
    if not families.is_hf_folder(path):
        return cfg
    fields = families.model_fields(path)
    for key, value in fields.items():
        mine = getattr(cfg.model, key)
        if f"model.{key}" in given and mine != value:
            raise UserError(f"model.{key}={mine} disagrees with {storage.join(path, families.CONFIG)} ({value}): "
                            f"leave model.{key} unset to take the folder's")
    file = families.tokenizer_file(path)
    if "data.tokenizer" in given and cfg.data.tokenizer.rstrip("/") not in (path.rstrip("/"), file):
        raise UserError(f"data.tokenizer={cfg.data.tokenizer} disagrees with checkpoint.init_from={path}, whose "
                        f"model was trained with its own tokenizer.json: leave data.tokenizer unset")
    longest = families.read_config(path).get("max_position_embeddings")
    if isinstance(longest, int) and cfg.model.seq_len > longest:
        raise UserError(f"model.seq_len={cfg.model.seq_len} is above {path}'s max_position_embeddings={longest}")
    out = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields),
                              data=dataclasses.replace(cfg.data, tokenizer=path))
    out.check_lm()
    return out


def keep_source(cfg: Config) -> None:
    """Copy the folder's config and tokenizer-side files (no weights) into RUN/source/, once: an export of the
    run writes them back (hub/hf.py), whether or not the folder is still there."""
    path = cfg.checkpoint.init_from
    mine = storage.join(cfg.run.path, families.SOURCE)
    if not families.is_hf_folder(path) or storage.isfile(storage.join(mine, families.CONFIG)):
        return
    for name in reversed(families.SIDECARS):  # config.json last: it marks the copy whole
        if storage.isfile(storage.join(path, name)):
            storage.write_text(storage.join(mine, name), storage.read_text(storage.join(path, name)))
    log.info(f"kept {path}'s config and tokenizer files in {mine}")
