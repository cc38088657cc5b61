// Data-plane roles of the app's identity, each at the narrowest scope that works:
// - on the storage account: Storage Blob Data Owner (Functions host: timer and singleton
//   leases, deployment package, run archive), Storage Queue Data Contributor (dispatch queue:
//   send, receive, delete, poison), Storage Table Data Contributor (routines, runs, host
//   diagnostic events);
// - on the Application Insights component: Monitoring Metrics Publisher (Entra-authenticated
//   telemetry ingestion; the component has local auth disabled).
// The Foundry role lives in foundry-rbac.bicep because the Foundry account may sit in another
// resource group. Role definition ids are the built-in role GUIDs (same in every tenant).

param storageAccountName string
param applicationInsightsName string

@description('Principal (object) id of the app\'s user-assigned identity.')
param principalId string

@description('Optional: object id of a developer who may read and write the Routines queue and tables (for inspection). Empty for none.')
param developerPrincipalId string = ''

var storageRoles = [
  {
    name: 'Storage Blob Data Owner'
    id: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  }
  {
    name: 'Storage Queue Data Contributor'
    id: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  }
  {
    name: 'Storage Table Data Contributor'
    id: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  }
]

// A developer needs neither blob access nor ownership: queue and table data are enough to
// inspect runs and peek at the dispatch queue with `--auth-mode login`.
var developerRoles = [
  {
    name: 'Storage Queue Data Contributor'
    id: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  }
  {
    name: 'Storage Table Data Contributor'
    id: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  }
]

var monitoringMetricsPublisherRoleId = '3913510d-42f4-4e42-8a64-420c390055eb'

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource appStorageRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for role in storageRoles: {
  name: guid(storage.id, principalId, role.id)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role.id)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'Routines function app: ${role.name}'
  }
}]

resource appMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(applicationInsights.id, principalId, monitoringMetricsPublisherRoleId)
  scope: applicationInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisherRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'Routines function app: Monitoring Metrics Publisher'
  }
}

// No developer given: the loop runs over an empty list and assigns nothing.
resource developerStorageRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for role in (empty(developerPrincipalId) ? [] : developerRoles): {
  name: guid(storage.id, developerPrincipalId, role.id)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role.id)
    principalId: developerPrincipalId
    description: 'Routines developer access: ${role.name}'
  }
}]
