"""The handlers of the README's quickstart (`cargo run -p pypool --example quickstart`)."""

from pypool_worker import handler


@handler
def predict(features):
    return sum(features) / len(features)


@handler
def remember(key, value, ctx):
    ctx.session[key] = value          # per-session state, dropped when the session ends


@handler
def recall(key, ctx):
    return ctx.session.get(key)
