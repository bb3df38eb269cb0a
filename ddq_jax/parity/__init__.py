"""Proving parity with the reference: ``verify`` (tensors, gradients,
optimiser steps, padding invariance) and the numeric targets."""
