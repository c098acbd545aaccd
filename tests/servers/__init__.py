"""Scripted upstream servers for tests: an OpenAI/Anthropic-compatible LLM and an MCP server.

Usable by any test: ``servers.llm.ScriptedLLM`` and ``servers.mcp_server.build_mcp_server``;
``servers.serving.running(app)`` serves an ASGI app with uvicorn on a free port.
"""
