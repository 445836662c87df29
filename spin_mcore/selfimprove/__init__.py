"""Verifier-based self-improvement on the SPIN stack: verifiers, ReST^EM, Iterative RPO, STaR."""
