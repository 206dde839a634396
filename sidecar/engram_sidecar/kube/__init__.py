"""The sidecar on Kubernetes: its lease/status agent (`agent`) and a small API client (`client`)."""
