"""Handlers the transport-stdio tests need beyond the shared conformance app."""

import os
import subprocess
import sys

import pypool_worker
from pypool_worker import handler

_children = []


@handler
def spawn_sleeper():
    """Start a grandchild (in the worker's process group) and return its pid."""
    child = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
    _children.append(child)  # keep the Popen alive; the test reaps the process itself
    return child.pid


@handler
def environment(names):
    return {name: os.environ.get(name) for name in names}


@handler
def cwd():
    return os.getcwd()


@handler
def runtime_file():
    return pypool_worker.__file__


@handler
def executable():
    return sys.executable
