"""Plumbing every stage shares: config sections, errors and entry, atomic files, guards, tracking, DDP."""
