"""One exception type for every user-facing problem.

Messages are a single sentence that says what is wrong and how to fix it; nodes
let it propagate so ComfyUI shows it on the node and keeps serving.
"""


class HDBError(ValueError):
    """A problem with the user's input (file, model, parameter), not a bug."""
