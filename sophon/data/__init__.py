"""Image domains (registry, offline and real loaders) and the defender/adversary split."""

from sophon.data.registry import DomainRequest, ImageSet, conform, domain_names, get_domain, load_domain, register_domain

__all__ = ["DomainRequest", "ImageSet", "conform", "domain_names", "get_domain", "load_domain", "register_domain"]
