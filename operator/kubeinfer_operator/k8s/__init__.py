"""The only code that talks to the Kubernetes API (besides kopf itself).

``client.KubeClient`` is a small async client (aiohttp) over the credentials
kopf logs in with (``login.login``), so the operator's own requests and
kopf's watches always use the same identity.

RBAC the operator needs (the Helm chart's Role/ClusterRole mirrors this list;
keep both in sync):

==================  =================================  ==========================================
API group           resources                          verbs (who, why)
==================  =================================  ==========================================
kubeinfer.io        endpoints                          get (KubeClient: fresh spec), list, watch
                                                       (kopf), patch (kopf: finalizer + its
                                                       progress annotations)
kubeinfer.io        endpoints/status                   patch (KubeClient: conditions, url, ...)
kubeinfer.io        endpoints/finalizers               update (children carry ownerReferences
                                                       with blockOwnerDeletion: the
                                                       OwnerReferencesPermissionEnforcement
                                                       admission plugin checks this)
apps                deployments                        get, list, create, patch, delete
                                                       (KubeClient: gateway + one per variant;
                                                       availability is read by listing)
"" (core)           services, configmaps               get, list, create, patch, delete
                                                       (KubeClient; incl. the headless
                                                       gateway-pods Service, never
                                                       resolved by the operator itself)
autoscaling         horizontalpodautoscalers           get, list, create, patch, delete
                                                       (KubeClient: the HPA of a variant
                                                       scaled on CPUUtilization alone; the
                                                       HPA, not the operator, then writes
                                                       that Deployment's replicas)
policy              poddisruptionbudgets               get, list, create, patch, delete
                                                   (KubeClient: the budget of a gateway or
                                                   variant Deployment of 2+ replicas)
kubeinfer.io        transformjobs                      get (KubeClient: fresh spec), list, watch
                                                       (kopf), patch (kopf's annotations; the
                                                       model pinned from an endpointRef)
kubeinfer.io        transformjobs/status               patch (KubeClient: phase, progress, ...)
kubeinfer.io        transformjobs/finalizers           update (the Jobs' ownerReferences)
kubeinfer.io        compilationjobs,                   get, list, watch, patch (as transformjobs)
                    recommendationjobs
kubeinfer.io        compilationjobs/status,            patch (KubeClient: phase, report, ...)
                    recommendationjobs/status
kubeinfer.io        compilationjobs/finalizers,        update (their Jobs', and a
                    recommendationjobs/finalizers      RecommendationJob's candidate
                                                       Deployments' and Services',
                                                       ownerReferences)
batch               jobs                               get, list, watch (kopf: a finished Job
                                                       starts the next step), create, delete
                                                       (KubeClient: planner, workers, finalizer;
                                                       TTL clean-up, stop on failure)
"" (core)           pods                               list, by label (KubeClient: the batch pods'
                                                       termination messages are their reports;
                                                       the ready gateway and fleet server
                                                       pods' IPs, which the operator scrapes
                                                       and polls instead of their tenant-
                                                       editable Services: ``pods``)
"" (core)           events                             create (kopf: handler errors as events)
kopf.dev            kopfpeerings (namespaced scope)    get, list, watch, patch (kopf peering)
                    or clusterkopfpeerings (cluster)
apiextensions.k8s.io customresourcedefinitions        list, watch (kopf: notices CRD installs)
"" (core)           namespaces                         list, watch (kopf, only when
                                                       KUBEINFER_NAMESPACES is set)
==================  =================================  ==========================================

Secrets: the namespace's runtime Secret only, get and patch by name, and create
(on Kubernetes 1.30+ the chart's admission policy admits only Opaque Secrets of that
name from the operator; model servers get the S3 Secret by name through
``envFrom``). Pods listed only, no wildcards. Writes use JSON merge patch (``PATCH``,
never ``PUT``); deletes use propagationPolicy Background.
"""
