"""The Neuronpedia export: features.jsonl records as SAEDashboard's `batch-N.json` feature records
(`records`) and Neuronpedia's bulk-import folder with explanations (`bulk`); the stage is
`tools.export_neuronpedia`, the layout docs/formats.md."""
