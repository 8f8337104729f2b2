"""Declarations shared by every stage: the run config, the data schema, the stage manifests."""
