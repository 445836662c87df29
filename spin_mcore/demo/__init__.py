"""The embedded CPU demo: a checkable arithmetic task, and the SFT -> SPIN vs continued-SFT experiment."""
