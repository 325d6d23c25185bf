"""The features stage (tools.top_activations) in parts: config, source, scan, select, write."""
