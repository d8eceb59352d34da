"""Serving many sequences at once: requests, a torch-free scheduler, a pool of fixed-size state
slots, a prefix (session) cache of states, the runner that executes steps on the model, and the
engine thread that ties them together. ``falcon_mamba.server`` puts HTTP in front of it."""
