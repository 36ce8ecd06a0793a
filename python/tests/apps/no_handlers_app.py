"""An app that forgot its @handler decorators: the worker must refuse to start."""


def predict(x):
    return x
