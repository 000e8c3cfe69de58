"""Next-token predictors: the language model's distribution and the online ensemble on top.

A predictor serves the streams of one block through three calls per lockstep step:
``want_logits(running)`` (which streams need the model, None for all),
``probabilities(logits, running)`` (float64 rows, unnormalised) and ``update(symbols)``.
Its settings are a JSON object stored in the container; :func:`make_predictor` rebuilds
the identical predictor from them when decoding.
"""
from __future__ import annotations

from dataclasses import fields

from .ensemble import DEFAULT_PRESET, PRESETS, EnsembleConfig, EnsemblePredictor
from .llm import LLMPredictor

LLM_ONLY = dict(LLMPredictor.settings)


def predictor_settings(config: EnsembleConfig | None) -> dict:
    """The container's record of a predictor: the model alone when ``config`` is None.

    An ensemble is recorded as the name of a frozen preset plus the fields that differ
    from it, which keeps headers short and stays exact if the defaults change later.
    """
    if config is None or config.llm_only:
        return dict(LLM_ONLY)

    # the default preset, or v5 for the integer arithmetic (never recorded as a change of a
    # float preset, which an older nacrith would reject as an unknown setting, not preset)
    name = "v5" if config.arithmetic == "integer" else DEFAULT_PRESET
    preset = PRESETS[name]
    changed = {f.name: getattr(config, f.name) for f in fields(config) if getattr(config, f.name) != getattr(preset, f.name)}
    return {**LLM_ONLY, "ensemble": name, **({"set": changed} if changed else {})}


def model_alone(settings: dict) -> bool:
    """Whether a container's predictor settings describe the model alone (no ensemble)."""
    return "ensemble" not in settings


def ensemble_config(settings: dict) -> EnsembleConfig | None:
    """The ensemble a container's predictor settings describe (None: the model alone)."""
    if settings.get("llm") != LLM_ONLY["llm"]:
        raise ValueError(f"unknown model probability function {settings.get('llm')!r}")
    extra = set(settings) - {"llm", "ensemble", "set"}
    if extra:
        raise ValueError(f"unknown predictor settings: {', '.join(sorted(extra))}")
    if model_alone(settings):
        return None
    if settings["ensemble"] not in PRESETS:
        raise ValueError(f"unknown ensemble preset {settings['ensemble']!r}")
    values = {**PRESETS[settings["ensemble"]].to_dict(), **settings.get("set", {})}
    return EnsembleConfig.from_dict(values)


def make_predictor(settings: dict, n_vocab: int, n_streams: int, pieces: list[bytes] | None = None, threads: int = 1):
    """The predictor a container's settings describe; ValueError for unknown settings.

    ``pieces`` (the tokenizer's piece table) lets the bias head tell line and word ends;
    ``threads`` spreads the full-vocabulary arithmetic (results do not depend on it).
    """
    config = ensemble_config(settings)
    if config is None:
        return LLMPredictor(n_vocab, n_streams, threads)
    if config.arithmetic == "integer":
        from .integer import IntegerEnsemblePredictor

        return IntegerEnsemblePredictor(n_vocab, n_streams, config, pieces, threads)
    return EnsemblePredictor(n_vocab, n_streams, config, pieces, threads)


__all__ = ["EnsembleConfig", "EnsemblePredictor", "LLMPredictor", "ensemble_config", "make_predictor", "model_alone", "predictor_settings"]
