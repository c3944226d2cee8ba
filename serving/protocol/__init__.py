"""What crosses between the router and the engines, and back to the client: the wire shapes.

- `messages`: typed messages between router and engine deployments, and the engines' routing stats
- `errors`: OpenAI-shaped error objects, their status codes and origins
- `streamlink`: a stream's body as frames from engine replica to router replica, beside the Ray call
"""
