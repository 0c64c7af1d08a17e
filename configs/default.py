"""Defaults: the small from-scratch decoder on the embedded synthetic dataset."""

from latentr3_jax.config import base_config


def get_config():
    return base_config()
