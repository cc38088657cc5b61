// The user-assigned managed identity the function app runs as. Every data-plane permission
// (storage, Application Insights ingestion, Foundry) is granted to this identity, never to keys.

@description('Name of the user-assigned managed identity.')
param name string

param location string = resourceGroup().location
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
