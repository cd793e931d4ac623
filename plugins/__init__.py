"""Framework adapters for slim_agents, shipped as ``slim_agents_plugins``.

Each adapter is a pluggy plugin registered in the ``slim_agents`` entry-point
group and needs its framework, installed by an extra::

    pip install 'slim-agents[mcp]'            # slim_agents_plugins.mcp
    pip install 'slim-agents[langchain]'      # slim_agents_plugins.langchain
    pip install 'slim-agents[pydantic-ai]'    # slim_agents_plugins.pydantic_ai
    pip install 'slim-agents[openai-agents]'  # slim_agents_plugins.openai_agents
    pip install 'slim-agents[upstream]'       # slim_agents_plugins.upstream (slim:// nodes)

Import an adapter module directly, or look it up by framework name with
:func:`slim_agents.framework_adapter`.
"""
