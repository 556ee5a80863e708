"""The operator's scaler on Kubernetes: its I/O (scale-request server, gateway scrapes,
Prometheus queries, Redis backlogs). Its decisions are ``reconcile.cluster_scaling``'s;
``handlers/`` only calls it."""
