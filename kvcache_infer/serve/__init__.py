"""Serving: the OpenAI-style API schema, the ASGI app, and its backends (a local Engine, Ray Serve replicas).

Imports go one way: serve -> engine -> runtime. Import the submodules you need (app, ray_serve): this
package imports nothing itself, so that `import kvcache_infer` never pulls in the server's libraries.
"""
