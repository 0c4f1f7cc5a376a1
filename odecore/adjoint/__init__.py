"""Gradients of a solve: the rule protocol between the core and a framework's autodiff."""
