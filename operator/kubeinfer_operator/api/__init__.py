"""API models of kubeinfer's custom resources; the CRDs are generated from them."""
