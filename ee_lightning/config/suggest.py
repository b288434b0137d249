"""The nearest valid key for a misspelt one, added to Hydra's composition error.

With the schemas (schema.py) Hydra rejects an unknown key, from the command line (`method.polcy.k=3`)
or from a yaml file, with OmegaConf's "Key 'polcy' not in 'ConsistentEEMethod'". Composition has one
entry point for both `hydra.main` (ee-train, ee-eval) and the compose API (tests, notebooks):
`ConfigLoaderImpl.load_configuration`. `install_suggestions` wraps it so that such an error also
says "did you mean method.policy?" and lists the valid keys.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import fields, is_dataclass

from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def valid_keys(error: BaseException) -> list[str]:
    """The keys the node that refused `error.key` accepts."""
    parent = getattr(error, "parent_node", None)
    if isinstance(parent, DictConfig):
        return [str(k) for k in parent.keys()]
    object_type = getattr(error, "object_type", None)
    return [f.name for f in fields(object_type)] if is_dataclass(object_type) else []


def nearest_key(key: str, candidates: list[str]) -> str | None:
    """The candidate closest to `key` (difflib's ratio >= 0.6), or None."""
    matches = difflib.get_close_matches(key, candidates, n=1)
    return matches[0] if matches else None


def unknown_key_error(error: BaseException):
    """The OmegaConf unknown-key error in `error`'s chain, or None."""
    for cause in _chain(error):
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "key", None):
            return cause
    return None


def suggestion(error: BaseException) -> str | None:
    """"did you mean ...?" for an unknown-key error in `error`'s chain. On a schema's node it also lists
    the valid keys; on a free-form node (trainer, a dict of grids) only a close match is worth saying."""
    cause = unknown_key_error(error)
    if cause is None:
        return None
    key, full_key = str(cause.key), str(getattr(cause, "full_key", None) or cause.key)
    prefix = full_key[: -len(key)] if full_key.endswith(key) else ""
    candidates = [k for k in valid_keys(cause) if not k.startswith("_")]
    near = nearest_key(key, candidates)
    guess = f"did you mean {prefix}{near}?" if near else ""
    if not is_dataclass(getattr(cause, "object_type", None)):
        return f"{full_key}: {guess}" if near else None
    where = prefix.rstrip(".") or "the root config"
    return f"{full_key} is not a known key: {guess + ' ' if guess else ''}(the keys of {where}: {', '.join(candidates)})"


def install_suggestions() -> None:
    """Make Hydra's composition errors for unknown keys name the nearest valid key (idempotent)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    original = ConfigLoaderImpl.load_configuration
    if getattr(original, "suggests_keys", False):
        return

    @functools.wraps(original)
    def load_configuration(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        except ConfigCompositionException as err:
            hint = suggestion(err)
            if hint is None:
                raise
            message = str(err)
            if is_dataclass(getattr(unknown_key_error(err), "object_type", None)):
                # Hydra's "To append to your config use +key=..." cannot work on a schema's node: dropped.
                message = "\n".join(line for line in message.splitlines() if not line.startswith("To append"))
            # Hydra prints this message, then the OmegaConf error it came from (when chained).
            raise ConfigCompositionException(f"{message}\n{hint}".lstrip()) from err.__cause__

    load_configuration.suggests_keys = True
    ConfigLoaderImpl.load_configuration = load_configuration
