"""microbatch inside Ray Serve (the `ray` extra): a thin HTTP front deployment behind Serve's
proxy, and batcher deployments whose replicas each run microbatch's engine (queues, deadlines,
admission, CPU pool or GPU). Importing this package imports Ray; nothing in server/ outside it
does. The application is built by app.py (`serve run server.ray_serve.app:app_builder`).
"""
